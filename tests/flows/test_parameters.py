"""Flow parameters, `AUDIO_PIPELINE_*` env and defaults: which one wins."""

from __future__ import annotations

import inspect

from flows.pipeline import parallel_transcribe_tokenise, settings_from_parameters

ENV = {
    "AUDIO_PIPELINE_RESULTS_ROOT": "s3://bucket/results",
    "AUDIO_PIPELINE_SERVICE_URL": "http://whisper.internal:9000",
    "AUDIO_PIPELINE_TOKENIZER": "simulated",
    "AUDIO_PIPELINE_BATCH_SIZE": "7",
    "AUDIO_PIPELINE_EXTENSIONS": ".flac, WAV",
    "AUDIO_PIPELINE_N_WORKERS": "3",
}


def settings_for_call(**given):
    """The settings the flow builds for a call that passes only `given` (defaults applied)."""
    bound = inspect.signature(parallel_transcribe_tokenise.fn).bind(**given)
    bound.apply_defaults()
    return settings_from_parameters(**bound.arguments)


def test_environment_fills_every_parameter_the_caller_left_out(monkeypatch):
    """Regression: the flow's own defaults ("rpq", 32, ...) masked the worker's environment."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings = settings_for_call(audio_root="audio")
    assert settings.results_root == "s3://bucket/results"
    assert settings.service_url == "http://whisper.internal:9000"
    assert (settings.tokenizer, settings.batch_size, settings.extensions, settings.n_workers) == (
        "simulated", 7, (".flac", ".wav"), 3)


def test_parameters_given_win_over_the_environment(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings = settings_for_call(audio_root="audio", tokenizer="rpq", batch_size=64, results_root="out")
    assert (settings.tokenizer, settings.batch_size, settings.results_root) == ("rpq", 64, "out")


def test_without_environment_the_documented_defaults_apply(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    settings = settings_for_call(audio_root="audio")
    assert (settings.results_root, settings.service_url, settings.tokenizer, settings.batch_size) == (
        "results", "http://localhost:8000", "rpq", 32)


def test_every_parameter_is_described_for_the_ui():
    properties = parallel_transcribe_tokenise.parameters.model_dump()["properties"]
    assert set(properties) == set(inspect.signature(parallel_transcribe_tokenise.fn).parameters)
    assert all(p.get("description") for p in properties.values()), properties


def test_extensions_from_env_as_a_list_or_as_json(monkeypatch):
    monkeypatch.setenv("AUDIO_PIPELINE_EXTENSIONS", '["flac", ".OGG"]')
    assert settings_for_call(audio_root="audio").extensions == (".flac", ".ogg")
    monkeypatch.setenv("AUDIO_PIPELINE_EXTENSIONS", "mp3")
    assert settings_for_call(audio_root="audio").extensions == (".mp3",)
