"""data.mix: a weighted blend of datasets in the trainer, its per-source val losses, and its refused forms."""

import logging
from pathlib import Path

import pytest
from fmcore import data
from fmcore.train.config import ConfigError, load_config, parse_mix
from fmcore.train.metrics import read_metrics
from fmcore.train.trainer import train

SMALL = ["--train.batch_size", "8", "--train.seq_len", "64", "--log.progress", "plain", "--log.tensorboard", "false",
         "--train.threads", "1", "--model.dim", "64", "--model.n_layers", "2", "--checkpoint.export_hf", "false",
         "--checkpoint.save_final", "false", "--train.eval_batches", "1"]


@pytest.fixture(scope="module")
def general(dataset, tmp_path_factory) -> Path:
    """Other text (the logging package) under the tiny dataset's tokenizer: a second source of a mix."""
    out = tmp_path_factory.mktemp("mix") / "general"
    return data.prepare([Path(logging.__file__).parent], out, tokenizer=dataset / "tokenizer.json",
                        val_fraction=0.2, workers=1, progress=False)


def record_batches(monkeypatch) -> list:
    """The training batches' inputs, as the trainer moves each to the device (monkeypatch.undo() stops it)."""
    from fmcore.train import trainer

    seen, real = [], trainer.to_device

    def recorded(batch, *rest):
        seen.append(batch.x.clone())
        return real(batch, *rest)

    monkeypatch.setattr(trainer, "to_device", recorded)
    return seen


def test_a_mix_logs_each_sources_val_loss(dataset, general, tmp_path, monkeypatch):
    from fmcore.train import trainer

    run = tmp_path / "run"
    cfg = load_config("tiny", ["--data.mix", f"{dataset}=0.7,{general}=0.3", "--log.run_dir", str(run), *SMALL,
                               "--train.steps", "2", "--train.eval_every", "1", "--log.every", "1",
                               "--checkpoint.every", "0"])
    calls, real = [], trainer.evaluate

    def recorded(model, cfg, data, *rest):
        loss, first = real(model, cfg, data, *rest)
        calls.append((data, loss))
        return loss, first

    monkeypatch.setattr(trainer, "evaluate", recorded)
    train(cfg)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    # Per evaluation: the blend's val loss, then each source's alone, each logged under its name.
    blend = [(dataset, 0.7), (general, 0.3)]
    assert [data for data, _ in calls] == [blend, dataset, general] * 2
    for r, k in zip(evals, (0, 3)):
        assert r["eval_loss"] == calls[k][1]
        assert r[f"eval_loss/{dataset.name}"] == calls[k + 1][1]
        assert r[f"eval_loss/{general.name}"] == calls[k + 2][1]
        assert calls[k + 1][1] != calls[k + 2][1]  # other text, another loss
    resolved = (run / "resolved.json").read_text()
    assert str(general) in resolved


def test_a_single_dataset_logs_no_source_losses(dataset, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", ["--data.dataset", str(dataset), "--log.run_dir", str(run), *SMALL,
                               "--train.steps", "1", "--checkpoint.every", "0"]))
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals and all(set(r) == {"step", "eval_loss", "eval_ppl"} for r in evals)


def test_parse_mix():
    assert parse_mix("a=0.7, b/c=0.3") == [("a", 0.7), ("b/c", 0.3)]
    assert parse_mix("x=y=2") == [("x=y", 2.0)]  # the weight follows the last "="
    assert parse_mix("a=0,b=1") == [("a", 0.0), ("b", 1.0)]  # (a source evaluated, not trained on)


@pytest.mark.parametrize("text, match", [
    ("a", r"data.mix: expected DIR=WEIGHT entries separated by commas, got 'a'"),
    ("a=0.5,", r"data.mix: expected DIR=WEIGHT .* got ''"),
    ("=0.5", r"got '=0.5'"),
    ("a=heavy", r"data.mix: the weight of 'a' must be a number, got 'heavy'"),
    ("a=0,b=0.0", r"data.mix: every weight is 0 in 'a=0,b=0.0': one must be > 0"),
    ("a=-1", r"data.mix: the weight of 'a' must be finite and >= 0, got '-1'"),
    ("a=nan", r"the weight of 'a' must be finite and >= 0"),
    ("a=inf", r"the weight of 'a' must be finite and >= 0"),
])
def test_malformed_mix_is_a_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", ["--data.mix", text])


def test_mix_and_dataset_together_is_a_config_error():
    with pytest.raises(ConfigError, match="data.mix and data.dataset are both set"):
        load_config("tiny", ["--data.mix", "a=1", "--data.dataset", "b"])


def test_a_mix_of_a_missing_directory_is_a_config_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match=rf"data.mix: {tmp_path / 'nope'} is not a directory"):
        train(load_config("tiny", ["--data.mix", f"{dataset}=1,{tmp_path / 'nope'}=1",
                                   "--log.run_dir", str(tmp_path / "run"), *SMALL, "--train.steps", "1"]))


def test_plan_memory_takes_a_mixs_vocabulary(dataset, general, capsys):
    # tiny takes the dataset's vocabulary; an empty data.dataset means the embedded corpus's (4096): a mix's plan
    # was made for that one.
    from fmcore.train.plan import main

    assert main(["tiny", "--data.dataset", str(dataset)]) == 0
    alone = capsys.readouterr().out
    assert main(["tiny", "--data.mix", f"{dataset}=0.5,{general}=0.5"]) == 0
    assert capsys.readouterr().out == alone


def test_an_annealing_phase_changes_the_mix_at_a_resume(dataset, general, tmp_path, capsys, monkeypatch):
    """Steps 1-2 on mix A; resumed with mix B and data.mix_change, steps 3-6 read what the loader's phase math gives
    (checked against a Loader resumed so; the sample -> source rule itself in tests/data/test_blend.py); resumed
    again at step 4 without the flag, the run goes on bitwise as the changed run did."""
    import torch

    mix_a, mix_b = f"{dataset}=0.7,{general}=0.3", f"{dataset}=0.2,{general}=0.8"
    common = [*SMALL, "--train.steps", "6", "--checkpoint.every", "2", "--log.every", "1"]
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(load_config("tiny", ["--data.mix", mix_a, "--log.run_dir", str(run_a), *common, "--train.steps", "2",
                               "--checkpoint.save_final", "true"]))
    at_2 = run_a / "checkpoints" / "step_00000002"
    with pytest.raises(ConfigError, match=r"saved with the mix .*data.mix_change = true"):
        train(load_config("tiny", ["--data.mix", mix_b, "--log.run_dir", str(run_b), *common,
                                   "--checkpoint.resume", str(at_2)]))
    capsys.readouterr()

    seen = record_batches(monkeypatch)
    train(load_config("tiny", ["--data.mix", mix_b, "--data.mix_change", "true", "--log.run_dir", str(run_b), *common,
                               "--checkpoint.resume", str(at_2)]))
    monkeypatch.undo()
    a, g = f"{dataset.name}=", f"{general.name}="
    assert f"data mix changes at sample 16 (step 2): {a}0.7,{g}0.3 -> {a}0.2,{g}0.8" in capsys.readouterr().out
    state_a = torch.load(at_2 / "extra_rank0.pt", weights_only=False)["loader"]
    state_4 = torch.load(run_b / "checkpoints" / "step_00000004" / "extra_rank0.pt", weights_only=False)["loader"]
    assert state_4["sample"] == 32 and state_4["phases"] == [[0, [0.7, 0.3]], [16, [0.2, 0.8]]]
    with data.Loader([(dataset, 0.2), (general, 0.8)], batch_size=8, seq_len=64, mode="random", seed=0) as loader:
        loader.load_state_dict(state_a, mix_change=True)
        for step in range(4):  # (the training batches come first; the final evaluation's after them)
            assert torch.equal(seen[step], next(loader).x), step

    train(load_config("tiny", ["--data.mix", mix_b, "--log.run_dir", str(run_c), *common,
                               "--checkpoint.resume", str(run_b / "checkpoints" / "step_00000004")]))
    losses = [{r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
              for run in (run_b, run_c)]
    assert losses[0][5] == losses[1][5] and losses[0][6] == losses[1][6]  # bitwise (written with repr)


def test_a_resume_adds_a_source_to_a_single_dataset_run(dataset, general, tmp_path, capsys, monkeypatch):
    """Steps 1-2 on data.dataset; resumed with data.mix adding general (data.mix_change), steps 3-4 read what a
    Loader resumed so reads (the dataset going on where it left off, general from its first sample: sample-exact in
    tests/data/test_blend.py), and evaluation logs the added source's val loss. Without the flag: refused."""
    import torch

    mix = f"{dataset}=0.5,{general}=0.5"
    common = [*SMALL, "--train.steps", "4", "--checkpoint.every", "2", "--log.every", "1", "--train.eval_every", "2"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(load_config("tiny", ["--data.dataset", str(dataset), "--log.run_dir", str(run_a), *common,
                               "--train.steps", "2", "--checkpoint.save_final", "true"]))
    at_2 = run_a / "checkpoints" / "step_00000002"
    with pytest.raises(ConfigError, match=rf"this loader adds {general.name}; .*data.mix_change = true"):
        train(load_config("tiny", ["--data.mix", mix, "--log.run_dir", str(run_b), *common,
                                   "--checkpoint.resume", str(at_2)]))
    with pytest.raises(ConfigError, match=r"lacks the state's source .*cannot remove a source"):
        train(load_config("tiny", ["--data.dataset", str(general), "--data.mix_change", "true", "--log.run_dir",
                                   str(run_b), *common, "--checkpoint.resume", str(at_2)]))
    capsys.readouterr()

    seen = record_batches(monkeypatch)
    train(load_config("tiny", ["--data.mix", mix, "--data.mix_change", "true", "--log.run_dir", str(run_b), *common,
                               "--checkpoint.resume", str(at_2), "--checkpoint.save_final", "true"]))
    monkeypatch.undo()
    d, g = dataset.name, general.name
    assert f"data mix changes at sample 16 (step 2): {d}=1 -> {d}=0.5,{g}=0.5 (adds {g})" in capsys.readouterr().out
    state_a = torch.load(at_2 / "extra_rank0.pt", weights_only=False)["loader"]
    state_4 = torch.load(run_b / "checkpoints" / "step_00000004" / "extra_rank0.pt", weights_only=False)["loader"]
    assert state_4["phases"] == [[0, [1.0, 0.0]], [16, [0.5, 0.5]]] and [n for n, _ in state_4["sources"]] == [d, g]
    with data.Loader([(dataset, 0.5), (general, 0.5)], batch_size=8, seq_len=64, mode="random", seed=0) as loader:
        loader.load_state_dict(state_a, mix_change=True)
        for step in range(2):  # (the training batches come first)
            assert torch.equal(seen[step], next(loader).x), step
    evals = [r for r in read_metrics(run_b / "metrics.jsonl") if "eval_loss" in r]
    assert evals and all(f"eval_loss/{g}" in r for r in evals)
