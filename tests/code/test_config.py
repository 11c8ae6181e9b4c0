"""The typed configuration: params.yaml, overrides, and rejected keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import Config, load_config
from pipelines.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_match_defaults_where_unset():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.ingest.dataset == "ml-latest-small"
    assert cfg.split.min_seq_len == 3
    assert cfg.validate_.drift.enabled is True


def test_missing_file_gives_defaults(tmp_path):
    assert load_config(tmp_path / "nope.yaml") == Config()


def test_override_sets_nested_key_with_yaml_typing(tmp_path):
    cfg = load_config(REPO / "params.yaml", ["split.min_seq_len=5", "split.event_types=[rate]"])
    assert cfg.split.min_seq_len == 5
    assert cfg.split.event_types == ["rate"]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'split.min_seq_length'"):
        load_config(REPO / "params.yaml", ["split.min_seq_length=5"])


def test_unknown_section_in_file_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("ingest:\n  dataset: games\nsplitt:\n  min_seq_len: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'splitt'"):
        load_config(p)


def test_mistyped_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"split.min_seq_len: .*got 'five'"):
        load_config(REPO / "params.yaml", ["split.min_seq_len=five"])


def test_out_of_range_value_is_rejected():
    with pytest.raises(ConfigError, match=r"split.min_seq_len"):
        load_config(REPO / "params.yaml", ["split.min_seq_len=2"])  # leave-one-out needs 3


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(REPO / "params.yaml", ["split.min_seq_len"])


def test_validate_section_keeps_its_name_in_messages():
    with pytest.raises(ConfigError, match=r"unknown key 'validate.nope'"):
        load_config(REPO / "params.yaml", ["validate.nope=1"])
