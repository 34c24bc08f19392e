"""`fmcore export RUN_DIR`: a run's checkpoint of any step as a Hugging Face directory that transformers
loads with the logits of the model restored from that checkpoint. The parallel layouts on 2 ranks:
tests/distributed/test_parallel_train.py."""

import json
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from fmcore.__main__ import main
from fmcore.data import Loader
from fmcore.train import models
from fmcore.train.config import ModelConfig, load_config
from fmcore.train.trainer import train

transformers = pytest.importorskip("transformers")


def _train(dataset, run, *extra):
    """4 steps of a small model, checkpoints at steps 2 and 4 (one thread: see test_trainer.SMALL)."""
    train(load_config("tiny", [
        "--data.dataset", str(dataset), "--log.run_dir", str(run), "--train.batch_size", "8", "--train.seq_len", "64",
        "--log.progress", "none", "--log.tensorboard", "false", "--train.threads", "1", "--train.steps", "4",
        "--model.dim", "64", "--model.n_layers", "2", "--schedule.warmup_steps", "0", "--train.eval_batches", "1",
        "--checkpoint.every", "2", "--checkpoint.keep_last", "0", *extra]))
    return run


@pytest.fixture(scope="module")
def gpt2_run(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory.mktemp("gpt2") / "run")


def _restored(run, step) -> torch.nn.Module:
    """The fmcore model of the run's checkpoint of step, read by torch.distributed.checkpoint into the
    state dict of the model resolved.json describes (one process wrote it: the keys are the model's)."""
    resolved = json.loads((run / "resolved.json").read_text())["model"]
    model = models.build_model(ModelConfig(**resolved | {"ops": "torch"}))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # ("torch.distributed is disabled ...": one process is intended)
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=run / "checkpoints" / f"step_{step:08d}", no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


def _assert_same_logits(hf_dir, model, vocab_size):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.randint(0, vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_steps_checkpoint_exports_with_its_logits(arch, dataset, gpt2_run, tmp_path, capsys):
    run = gpt2_run if arch == "gpt2" else _train(dataset, tmp_path / "run", "--model.arch", "llama",
                                                 "--model.tie_embeddings", "false")
    out = tmp_path / "hf2"
    assert main(["export", str(run), "--step", "2", "--out", str(out)]) == 0
    assert f"step_00000002 -> {out} (fp32 weights)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["torch_dtype"] == "float32"
    tok = Loader.manifest(dataset)["tokenizer"]
    assert config["eos_token_id"] == tok["eos_id"] and (out / "tokenizer.json").read_bytes() == (
        dataset / tok["file"]).read_bytes()
    step2, step4 = _restored(run, 2), _restored(run, 4)
    _assert_same_logits(out, step2, 1024)
    # (and not the newest checkpoint's: 2 steps at lr 1e-3 move every weight)
    assert not torch.equal(step2.blocks[0].attn_out.weight if arch == "gpt2" else step2.blocks[0].wo.weight,
                           step4.blocks[0].attn_out.weight if arch == "gpt2" else step4.blocks[0].wo.weight)


def test_the_default_is_the_newest_complete_checkpoint(gpt2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gpt2_run, run)
    # a save that crashed before its rename: a later step, never complete
    shutil.copytree(run / "checkpoints" / "step_00000004", run / "checkpoints" / ".tmp-step_00000006")
    assert main(["export", str(run)]) == 0
    assert sorted(p.name for p in run.glob("hf-*")) == ["hf-step4"]
    # the end of the run exported the same weights (checkpoint.export_hf, on by default)
    got, want = load_file(run / "hf-step4" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    _assert_same_logits(run / "hf-step4", _restored(run, 4), 1024)


def test_a_bf16_run_exports_its_fp32_master_weights(dataset, tmp_path):
    run = _train(dataset, tmp_path / "run", "--train.precision", "bf16", "--model.ops", "fmcore")
    assert main(["export", str(run)]) == 0
    masters, bf16 = load_file(run / "hf-step4" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert json.loads((run / "hf-step4" / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in masters.values()} == {torch.float32} and masters.keys() == bf16.keys()
    # the end of the run wrote the bf16 parameters: the masters rounded, which they are not themselves
    assert all(torch.equal(masters[k].bfloat16(), bf16[k]) for k in bf16)
    assert any(not torch.equal(masters[k], bf16[k].float()) for k in bf16)


def test_the_dataset_and_the_recorded_model_config_are_not_needed(gpt2_run, tmp_path, capsys):
    # The dataset moved away, and a checkpoint from before they recorded their resolved model config: the
    # vocabulary (config.toml says 0: the dataset's) is the saved embedding's.
    run = tmp_path / "run"
    shutil.copytree(gpt2_run, run)
    gone = str(tmp_path / "moved-away")
    resolved = json.loads((run / "resolved.json").read_text())
    (run / "resolved.json").write_text(json.dumps(resolved | {"dataset": gone}))
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(resolved["dataset"], gone))
    extra_path = run / "checkpoints" / "step_00000004" / "extra_rank0.pt"
    extra = torch.load(extra_path, weights_only=False)
    del extra["resolved_model"]
    torch.save(extra, extra_path)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert f"no tokenizer.json written: the run's dataset is not readable ({gone}: dataset not found" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 1024
    _assert_same_logits(tmp_path / "hf", _restored(gpt2_run, 4), 1024)


def test_errors_name_the_path(gpt2_run, tmp_path, capsys):
    def error(*args):
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fmcore export: error: ") and "Traceback" not in err
        return err

    assert f"RUN_DIR {tmp_path / 'nothere'} is not a directory" in error(tmp_path / "nothere")
    (tmp_path / "plain").mkdir()
    assert f"RUN_DIR {tmp_path / 'plain'} is not an fmcore run dir: it holds no config.toml" in error(
        tmp_path / "plain")
    assert "--step 3: " in (err := error(gpt2_run, "--step", "3")) and "its steps are 2, 4" in err
    run = tmp_path / "run"
    shutil.copytree(gpt2_run, run)
    (run / "out").mkdir()
    (run / "out" / "notes.txt").write_text("mine")
    assert f"--out {run / 'out'} is not empty: pass --overwrite" in error(run, "--out", run / "out")
    # (under a file: NotADirectoryError's traceback, after the checkpoint was read)
    assert f"--out {run / 'out' / 'notes.txt' / 'hf'} cannot be made: Not a directory" in error(
        run, "--out", run / "out" / "notes.txt" / "hf")
    assert main(["export", str(run), "--out", str(run / "out"), "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "out").iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                                "tokenizer.json"]
    for step in (2, 4):  # saves that never finished: none complete
        (run / "checkpoints" / f"step_{step:08d}").rename(run / "checkpoints" / f".tmp-step_{step:08d}")
    err = error(run)
    assert f"{run / 'checkpoints'} holds no complete checkpoint (.tmp-step_00000002, .tmp-step_00000004: a save" in err
    shutil.rmtree(run / "checkpoints")
    assert f"{run / 'checkpoints'} holds no complete checkpoint: a run saves one" in error(run)
