"""Config resolution: file < named options < --set, TOML literals, and the errors for bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from bloger_cli.config import PrepareConfig, config_hash, load_config_file, parse_override, resolve_config
from bloger_cli.errors import ConfigError


def toml(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_file_then_options_then_set(tmp_path):
    cfg_file = toml(tmp_path, """
        [prepare]
        input = "from-file.json"
        min_user_interactions = 7
        min_item_interactions = 8
        max_history = 9
    """.replace("\n        ", "\n"))
    cfg = resolve_config(
        "prepare", cfg_file,
        options={"min_item_interactions": 3, "max_history": 4, "min_user_interactions": None},  # None = not given
        sets=["max_history=2"],
    )
    assert cfg.input == Path("from-file.json")  # file only
    assert cfg.min_user_interactions == 7  # file; the None option does not override it
    assert cfg.min_item_interactions == 3  # option beats file
    assert cfg.max_history == 2  # --set beats option and file


def test_later_set_wins():
    cfg = resolve_config("prepare", None, {"input": Path("x")}, ["max_history=3", "max_history=11"])
    assert cfg.max_history == 11


def test_dotted_set_reaches_nested_section():
    cfg = resolve_config("prepare", None, {"source": "synthetic"},
                         ["synthetic.users=7", "prepare.synthetic.seed=3", "prepare.max_history=5"])
    assert (cfg.synthetic.users, cfg.synthetic.seed, cfg.max_history) == (7, 3, 5)
    assert cfg.synthetic.items == 500  # untouched keys keep their defaults


def test_set_merges_into_a_nested_section_from_the_file(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\nsource = "synthetic"\n[prepare.synthetic]\nusers = 9\nseed = 4\n')
    cfg = resolve_config("prepare", cfg_file, {}, ["synthetic.seed=5"])
    assert (cfg.synthetic.users, cfg.synthetic.seed) == (9, 5)


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError) as exc:
        resolve_config("prepare", None, {"input": Path("x")}, ["max_history=3", "max_history.deep=1"])
    assert str(exc.value) == "--set max_history.deep: 'max_history' is a value, not a section"
    # a value key first seen as a section fails validation instead, naming the field
    with pytest.raises(ValidationError) as exc:
        resolve_config("prepare", None, {"input": Path("x")}, ["max_history.deep=1"])
    assert [e["loc"] for e in exc.value.errors()] == [("max_history",)]


@pytest.mark.parametrize(("raw", "value"), [
    ("3", 3), ("-2", -2), ("1_000", 1000), ("0.5", 0.5), ("1e3", 1000.0), ("true", True), ("false", False),
    ('"quoted 12"', "quoted 12"), ("'single'", "single"), ("plain words", "plain words"),
    ("data/x.json", "data/x.json"), ("  7  ", 7), ("a=b", "a=b"), ("", ""), ("[1, 2]", [1, 2]),
])
def test_override_values_are_toml_literals_else_strings(raw, value):
    parts, parsed = parse_override("prepare", f"key={raw}")
    assert parts == ["key"]
    assert parsed == value and type(parsed) is type(value)


def test_override_strips_only_the_own_stage_prefix():
    assert parse_override("prepare", "prepare.synthetic.users=3") == (["synthetic", "users"], 3)
    assert parse_override("prepare", "embed.model=x") == (["embed", "model"], "x")  # then an unknown key


@pytest.mark.parametrize(("text", "message"), [
    ("no_equals", "--set 'no_equals': expected key=value, e.g. --set min_user_interactions=3"),
    ("=3", "--set '=3': expected key=value, e.g. --set min_user_interactions=3"),
    ("prepare=3", "--set 'prepare=3': empty key"),
    ("a..b=3", "--set 'a..b=3': empty key"),
])
def test_malformed_override(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_override("prepare", text)
    assert str(exc.value) == message


def test_toml_values_are_typed(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\ninput = "a b.json"\nmin_rating = 3.5\nmax_history = 12\n'
                              'duplicates = "all"\n[prepare.synthetic]\ndrift = 0.25\n')
    cfg = resolve_config("prepare", cfg_file)
    assert cfg.input == Path("a b.json")
    assert cfg.min_rating == 3.5 and cfg.max_history == 12 and cfg.duplicates == "all"
    assert cfg.synthetic.drift == 0.25


def test_set_bool_and_float_values():
    cfg = resolve_config("prepare", None, {"input": Path("x")}, ["min_rating=4", "duplicates=all"])
    assert cfg.min_rating == 4.0 and isinstance(cfg.min_rating, float)
    assert cfg.duplicates == "all"


def test_other_sections_are_ignored_by_a_stage(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\ninput = "x"\n[embed]\nwhatever = 1\n')
    assert resolve_config("prepare", cfg_file).input == Path("x")


def test_unknown_key_via_set():
    with pytest.raises(ValidationError) as exc:
        resolve_config("prepare", None, {"input": Path("x")}, ["min_users=3"])
    [error] = exc.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ("min_users",)


def test_unknown_nested_key_in_file(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\nsource = "synthetic"\n[prepare.synthetic]\nuser = 3\n')
    with pytest.raises(ValidationError) as exc:
        resolve_config("prepare", cfg_file)
    [error] = exc.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ("synthetic", "user")


def test_unknown_section(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\ninput = "x"\n[prepar]\ninput = "y"\n[zzz]\n')
    with pytest.raises(ConfigError) as exc:
        load_config_file(cfg_file)
    assert str(exc.value) == (
        f"config file {cfg_file}: unknown section(s) 'prepar', 'zzz'; sections are the stage names: "
        "prepare, embed, tokenize, train-bilevel, evaluate, export-ids, recommend, export-model, baseline, report"
    )


def test_stage_section_must_be_a_table(tmp_path):
    cfg_file = toml(tmp_path, 'prepare = 3\n')
    with pytest.raises(ConfigError) as exc:
        resolve_config("prepare", cfg_file)
    assert str(exc.value) == f"config file {cfg_file}: [prepare] must be a table"


def test_invalid_toml_names_the_file_and_line(tmp_path):
    cfg_file = toml(tmp_path, '[prepare]\ninput = "unterminated\n')
    with pytest.raises(ConfigError) as exc:
        load_config_file(cfg_file)
    assert str(exc.value).startswith(f"config file {cfg_file} is not valid TOML: ")
    assert "line 2" in str(exc.value)


def test_config_file_that_is_not_utf8(tmp_path):
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_bytes(b'[prepare]\ninput = "\xff"\n')
    with pytest.raises(ConfigError) as exc:
        load_config_file(cfg_file)
    assert str(exc.value) == f"config file {cfg_file} is not UTF-8 text (invalid start byte at byte 19)"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        resolve_config("prepare", tmp_path / "nope.toml")
    assert str(exc.value) == f"config file {tmp_path / 'nope.toml'} does not exist"


def messages(exc: pytest.ExceptionInfo) -> list[str]:
    return [e["msg"].removeprefix("Value error, ") for e in exc.value.errors()]


def test_input_required_unless_synthetic():
    with pytest.raises(ValidationError) as exc:
        PrepareConfig(source="recbole")
    assert messages(exc) == ["input is required when source is 'recbole' (give --input PATH)"]
    assert PrepareConfig(source="synthetic").input is None


def test_synthetic_takes_no_input():
    with pytest.raises(ValidationError) as exc:
        PrepareConfig(source="synthetic", input=Path("x"))
    assert messages(exc) == ["input must not be set when source is 'synthetic'"]


@pytest.mark.parametrize("given", [{}, {"user_col": "u"}, {"item_col": "i"}])
def test_table_needs_user_and_item_columns(given):
    with pytest.raises(ValidationError) as exc:
        PrepareConfig(source="table", input=Path("t.csv"), **given)
    assert messages(exc) == ["source 'table' needs both user_col and item_col (--user-col, --item-col)"]


def test_column_options_only_for_table():
    with pytest.raises(ValidationError) as exc:
        PrepareConfig(source="letter", input=Path("x"), user_col="u", time_col="t")
    assert messages(exc) == ["user_col, time_col only apply to source 'table', not 'letter'"]


@pytest.mark.parametrize(("field", "value"), [
    ("min_user_interactions", 0), ("max_history", 0), ("duplicates", "last"), ("source", "csv"),
])
def test_field_validators(field, value):
    with pytest.raises(ValidationError) as exc:
        PrepareConfig(input=Path("x"), **{field: value})
    assert [e["loc"] for e in exc.value.errors()] == [(field,)]


def test_synthetic_items_at_least_categories():
    with pytest.raises(ValidationError) as exc:
        resolve_config("prepare", None, {"source": "synthetic"}, ["synthetic.items=3", "synthetic.categories=4"])
    assert messages(exc) == ["synthetic.items (3) must be at least synthetic.categories (4)"]


def test_config_hash_is_stable_and_sensitive():
    a = PrepareConfig(input=Path("x.json"))
    assert config_hash(a) == config_hash(PrepareConfig(input=Path("x.json")))
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    # the same values reached through different routes hash the same
    assert config_hash(a) == config_hash(resolve_config("prepare", None, {"input": Path("x.json")}, ["max_history=20"]))
    assert config_hash(a) != config_hash(PrepareConfig(input=Path("x.json"), max_history=19))
    # where the input lies is an input of the run (`file:PATH`), not part of its config
    assert config_hash(a) == config_hash(PrepareConfig(input=Path("y.json"), items=Path("i.json")))
    assert config_hash(a) != config_hash(PrepareConfig(input=Path("x.json"), synthetic={"seed": 1}))


@given(st.integers(1, 10_000), st.integers(1, 10_000))
def test_config_hash_tells_thresholds_apart(u, i):
    a = PrepareConfig(input=Path("x"), min_user_interactions=u, min_item_interactions=i)
    b = PrepareConfig(input=Path("x"), min_user_interactions=i, min_item_interactions=u)
    assert (config_hash(a) == config_hash(b)) == (u == i)


def test_none_text_turns_an_optional_setting_off() -> None:
    from bloger_cli.config import TrainBilevelConfig, TrainConfig

    cfg = TrainBilevelConfig(train={"clip_norm": "none", "patience": "null"})
    assert cfg.train.clip_norm is None and cfg.train.patience is None
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr="none")  # not optional: still an error
