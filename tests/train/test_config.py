"""Config: presets load, TOML + overrides resolve, unknown keys and bad values raise naming the key."""

import pytest

from fmcore.train.config import Config, ConfigError, help_text, load_config, presets, to_toml, validate


def test_presets_load_and_validate():
    assert {"tiny", "gpt2-124m", "gpt2-350m", "llama-1b"} <= set(presets())
    for name in presets():
        cfg = load_config(name)
        assert cfg.name == name
    assert load_config("llama-1b").model.n_kv_heads == 4
    assert load_config(None).name == "tiny"  # the default run


def test_overrides_both_spellings_and_types():
    cfg = load_config("tiny", ["--optim.lr", "1e-3", "--train.steps=7", "--train.compile", "true",
                               "--model.arch=llama", "--resume", "auto", "--name", "x"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.train.compile == "blocks"
    assert cfg.model.arch == "llama" and cfg.checkpoint.resume == "auto" and cfg.name == "x"


def test_toml_file_and_round_trip(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('[model]\narch = "llama"\ndim = 64\nn_heads = 4\n[optim]\nlr = 1\n')
    cfg = load_config(str(path), ["--train.steps", "3"])
    assert cfg.name == "my" and cfg.model.dim == 64 and cfg.optim.lr == 1.0 and cfg.train.steps == 3
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    back = load_config(str(again))
    back.name = cfg.name
    assert back == cfg
    # Strings with what a TOML basic string cannot hold raw (control characters) or must escape.
    odd = load_config("tiny", ["--name", 'a\nb\x01"q"\\ \x7f\tend', "--data.dataset", "/d/日本"])
    (tmp_path / "odd.toml").write_text(to_toml(odd))
    assert load_config(str(tmp_path / "odd.toml")) == odd


@pytest.mark.parametrize("args, match", [
    (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
    (["--optimizer.lr", "1"], "unknown config section 'optimizer'"),
    (["--optim.lr", "fast"], "optim.lr: expected float, got 'fast'"),
    (["--train.steps", "1.5"], "train.steps: expected int"),
    (["--train.compile", "maybe"], "train.compile: expected one of 'none', 'model', 'blocks', true or false"),
    (["--model.arch", "bert"], "model.arch: expected one of"),
    (["--optim.lr"], "missing a value"),
    (["--train.steps", "--optim.lr", "1"], "--train.steps: missing a value"),
    (["--lr", "1"], "expected --section.key"),
    (["stray"], "unexpected argument 'stray'"),
    (["--model.dim", "100", "--model.n_heads", "3"], "multiple of model.n_heads"),
    (["--train.seq_len", "4096"], "exceeds model.max_seq_len"),
    (["--train.seed", str(2**64)], r"train.seed: expected at most 18446744073709551615"),
    (["--data.threads", "100000"], "data.threads: expected at most 1024"),
    (["--train.threads", "100000"], "train.threads: expected at most 1024"),
    (["--model.arch", "llama", "--model.n_heads", "4", "--model.n_kv_heads", "3"],
     r"model.n_kv_heads \(3\) must divide model.n_heads \(4\)"),
    (["--model.n_kv_heads", "1"], "grouped-query attention is a llama feature; gpt2 needs n_kv_heads = 0"),
    (["--model.arch", "llama", "--model.dim", "96", "--model.n_heads", "32"],
     "llama's RoPE needs an even head dim, got 3"),
    (["--model.arch", "llama", "--model.head_dim", "15"], "llama's RoPE needs an even head dim, got 15"),
    (["--model.qk_norm", "true", "--model.head_dim", "32"],
     r"model.qk_norm = True, model.head_dim = 32: a llama feature; gpt2 needs qkv_bias and qk_norm false"),
    (["--model.sliding_window", "64"], r"model.sliding_window = 64: a llama feature; gpt2 needs"),
    (["--model.arch", "llama", "--model.sliding_window", "-1"], r"model.sliding_window: expected a value >= 0"),
    (["--model.qkv_bias", "true"], "model.qkv_bias = True: a llama feature"),
    (["--model.rope_scaling", "llama3", "--model.rope_high_freq_factor", "1"],
     r"model.rope_high_freq_factor \(1.0\) must exceed model.rope_low_freq_factor \(1.0\)"),
    (["--model.rope_scaling", "yarn"], "model.rope_scaling: expected one of 'none', 'llama3', got 'yarn'"),
    (["--model.init_from", "/nonexistent/dir"], r"model.init_from: /nonexistent/dir/config.json not found"),
])
def test_override_errors_name_the_key(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", args)



def test_a_head_dim_frees_dim_from_being_a_multiple_of_n_heads():
    # Qwen3's shapes: heads of head_dim, n_heads * head_dim features, whatever dim is (70: no multiple of 4)
    args = ["--model.arch", "llama", "--model.dim", "70", "--model.n_heads", "4"]
    with pytest.raises(ConfigError, match=r"model.dim \(70\) must be a multiple of model.n_heads \(4\) unless "
                                          "model.head_dim is set"):
        load_config("tiny", args)
    assert load_config("tiny", [*args, "--model.head_dim", "24"]).model.head_dim == 24
    # gpt2's head dim is dim / n_heads: naming it is no error
    assert load_config("tiny", ["--model.head_dim", "64"]).model.head_dim == 64


def _numeric_fields():
    cfg = Config()
    for section, sub in vars(cfg).items():
        if section == "name":
            continue
        for key, value in vars(sub).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{section}.{key}", value


@pytest.mark.parametrize("key", [k for k, _ in _numeric_fields()])
def test_every_numeric_field_refuses_what_no_run_can_use(key):
    """-1, NaN and infinity: each field refuses them at load, naming itself, rather than failing deep in
    a run (a negative ffn_dim in the model's constructor, eval_batches 0 as a ZeroDivisionError, a NaN
    grad_clip as no clipping at all, max_skipped 0 stopping the first step)."""
    value = dict(_numeric_fields())[key]
    for bad in (-1, float("nan"), float("inf")) if isinstance(value, float) else (-1,):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny", [f"--{key}", str(bad)])

@pytest.mark.parametrize("value, match", [
    ("10", r"log.profile: expected START:END, train steps START to END - 1"),
    ("a:b", r"log.profile: expected START:END, train steps START to END - 1"),
    ("1:2:3", r"log.profile: expected START:END, train steps START to END - 1"),
    ("0:3", r"log.profile: expected START:END with 1 <= START < END <= train.steps \+ 1 = 301 .*got '0:3'"),
    ("5:5", r"log.profile: expected START:END with 1 <= START < END .*got '5:5'"),
    ("6:3", r"log.profile: expected START:END with 1 <= START < END .*got '6:3'"),
    ("299:302", r"log.profile: expected START:END with 1 <= START < END <= train.steps \+ 1 = 301 \(steps START to "
                r"END - 1 of the run's 300\), got '299:302'"),
])
def test_a_profile_window_outside_the_run_names_log_profile(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", ["--log.profile", value])
    cfg = load_config("tiny", ["--log.profile", "299:301"])  # (the tiny preset's last two steps: taken)
    cfg.train.steps = 100  # changed in code: train() validates it again
    with pytest.raises(ConfigError, match=r"log.profile: .*got '299:301'"):
        validate(cfg)


def test_toml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key 'model.width'"):
        load_config(str(bad))
    bad.write_text('[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: train.steps: expected int"):
        load_config(str(bad))
    bad.write_text("[train]\nsteps = 1.5\n")
    with pytest.raises(ConfigError, match=r"bad.toml: train.steps: expected int, got float 1.5"):
        load_config(str(bad))
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: Expected ']'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"config file .*missing.toml not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'steps'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a TOML file nor a preset"):
        load_config("gpt5")


def test_every_field_has_a_docstring():
    text = help_text()
    import dataclasses
    for section in dataclasses.fields(Config):
        if section.name == "name":
            continue
        for f in dataclasses.fields(type(getattr(Config(), section.name))):
            line = f"--{section.name}.{f.name} "
            assert line in text
            doc = text.split(line, 1)[1].split("\n")[1].strip()
            assert doc, f"{section.name}.{f.name} has no docstring"


def test_help_lists_the_run_name():
    # --name is an override like the others (the top-level key of a TOML config); --help listed only
    # the sections' keys, so the one setting that picks the default run dir was not in it.
    text = help_text()
    assert "--name (str, default the preset's name" in text
    assert "Name of the run" in text.split("--name ", 1)[1].split("\n")[1]


@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "/tmp/x", "a/b"])
def test_a_run_name_that_is_not_one_directory_name_is_refused(name):
    # The default run dir is runs/<name>: --name '' wrote the run's files into runs/ itself, and
    # --name ../../x or /tmp/x put it outside runs/.
    with pytest.raises(ConfigError, match=r"name: the default run dir is runs/<name>, so the name must be one"):
        load_config("tiny", ["--name", name])
    assert load_config("tiny", ["--name", name, "--log.run_dir", "elsewhere"]).name == name
    assert load_config("tiny", ["--name", "my run"]).name == "my run"
