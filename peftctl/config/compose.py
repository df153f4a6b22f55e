"""Find recipes and config groups, and compose a recipe with Hydra overrides into a RunConfig."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from peftctl.adapters.core.registry import available_methods, get_method
from peftctl.config.schema import RunConfig, build_run_config
from peftctl.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = "tiny_lora"


def resource_dir(name: str) -> Path:
    """`configs/` or `recipes/`: inside the installed wheel, else at the top of the source checkout."""
    for candidate in (PACKAGE_DIR / "_resources" / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"cannot find the peftctl {name}/ folder; reinstall peftctl")


def list_recipes() -> dict[str, str]:
    """Recipe name -> the one-line description from its `description:` key."""
    recipes = {}
    for path in sorted(resource_dir("recipes").glob("*.yaml")):
        match = re.search(r"^description:\s*(.+)$", path.read_text(), flags=re.MULTILINE)
        recipes[path.stem] = match.group(1).strip().strip("\"'") if match else ""
    return recipes


def split_recipe(overrides: list[str]) -> tuple[str, list[str]]:
    """Take `recipe=NAME` out of the override list."""
    recipe, rest = DEFAULT_RECIPE, []
    for item in overrides:
        if item.startswith("recipe="):
            recipe = item.split("=", 1)[1]
        else:
            rest.append(item)
    return recipe, rest


def _suggest_key(key: str, recipe: str) -> str:
    """', did you mean X?' for a misspelt dotted key, from the recipe's keys (and the adapter's fields)."""
    try:
        values = compose_dict([f"recipe={recipe}"])
    except ConfigError:
        return ""
    parent, _, leaf = key.rpartition(".")
    node: Any = values
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    candidates = list(node) if isinstance(node, dict) else []
    if parent == "adapter" and isinstance(node, dict):
        try:
            candidates += get_method(node.get("method", "lora")).config_cls.field_names()
        except ConfigError:
            pass
    close = difflib.get_close_matches(leaf, candidates, n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


# characters Hydra's override lexer refuses in an unquoted value (non-ASCII letters too)
_UNQUOTED_OK = re.compile(r"[A-Za-z0-9_\-/\\+.$%*@?|: \t]*")


def quote_value_if_needed(override: str) -> str:
    """`output_dir=my dir/dätä (1)` -> `output_dir='my dir/dätä (1)'`: a plain path or text value that
    Hydra's lexer would reject is quoted for the user. Values that use the grammar (quotes, lists,
    dicts, sweeps with commas, ${interpolations}) are left as they are."""
    key, sep, value = override.partition("=")
    if not sep or not value or _UNQUOTED_OK.fullmatch(value) or value[0] in "'\"[{" or "," in value or "${" in value:
        return override
    quote = "'" if "'" not in value else '"'
    if quote in value or value.endswith("\\"):
        return override  # both quote kinds, or a trailing backslash that would escape the closing quote
    return f"{key}={quote}{value}{quote}"


def _first_unparsable(overrides: list[str]) -> str:
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception:
            return override
    return ""


def unparsable_override_hint(text: str, overrides: list[str]) -> str | None:
    """For Hydra's lexer / parser errors: the override it could not read and how to quote it."""
    match = re.search(
        r"(?:LexerNoViableAltException|mismatched input|token recognition error|extraneous input"
        r"|no viable alternative)[^\n]*",
        text,
    )
    if not match:
        return None
    override = _first_unparsable(overrides)
    key, _, value = override.partition("=")
    key = key or "key"
    shown = f" {override!r}" if override else ""
    if value[:1] in ("[", "{"):
        return (
            f"cannot parse the override{shown}: a list is written {key}=[a,b], a mapping {key}={{a: 1}}; "
            "quote any item with special characters"
        )
    return (
        f"cannot parse the override{shown}: quote a value with special characters, e.g. {key}='my dir/(1)' "
        f"(in the shell: \"{key}='my dir/(1)'\")"
    )


def _explain_hydra_error(exc: Exception, recipe: str, overrides: list[str]) -> str:
    text = str(exc)
    hint = unparsable_override_hint(text, overrides)
    if hint:
        return hint
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        key = match.group(1)
        hint = _suggest_key(key, recipe) or f" (`peftctl show recipe={recipe}` lists every key)"
        return f"{key} is not a known config key{hint}"
    match = re.search(
        r"Could not find '([^/']+)/([^']+)'.*?Available options in '[^']+':\s*(.*?)(?:\n\S|\Z)", text, flags=re.DOTALL
    )
    if match:
        group, choice, options = match.group(1), match.group(2), ", ".join(match.group(3).split())
        return f"{group}={choice} is not a known {group} config; valid: {options}"
    if "Cannot find primary config" in text or f"'{recipe}'" in text and "not found" in text:
        return f"recipe={recipe} is not a known recipe; valid: {', '.join(list_recipes())}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"bad override: {first}"


# top-level spellings the CLI accepts for a nested field: `peftctl train ... resume=true`
SHORTHANDS = {"resume": "train.resume"}


def _force_field_override(override: str) -> str:
    """`section.key=value` -> `++section.key=value`: a field the recipe's YAML leaves out (so
    Hydra does not know it) is still settable; the typed schema then checks every key and value,
    with a did-you-mean for misspellings. Group choices (`adapter=dora`) stay as they are."""
    key = override.split("=", 1)[0]
    if key in SHORTHANDS and "=" in override:
        key = SHORTHANDS[key]
        override = key + "=" + override.split("=", 1)[1]
    if "." in key and not key.startswith(("+", "~")) and "=" in override:
        return "++" + override
    return override


def compose_dict(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose `recipe=NAME` + Hydra overrides into a plain dict (no validation yet)."""
    recipe, rest = split_recipe(list(overrides or []))
    for item in rest:
        if "=" not in item and not item.startswith("~"):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
    if recipe not in list_recipes():
        raise ConfigError(f"recipe={recipe} is not a known recipe; valid: {', '.join(list_recipes())}")
    GlobalHydra.instance().clear()
    search_path = f"hydra.searchpath=[file://{resource_dir('configs')}]"
    quoted = [quote_value_if_needed(o) for o in rest]
    try:
        with initialize_config_dir(config_dir=str(resource_dir("recipes")), version_base=None):
            cfg = compose(config_name=recipe, overrides=[search_path, *map(_force_field_override, quoted)])
        values = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's many exception types: all mean a bad override or recipe
        raise ConfigError(_explain_hydra_error(exc, recipe, quoted)) from None
    finally:
        GlobalHydra.instance().clear()
    values.pop("hydra", None)
    values["recipe"] = recipe
    drop_recipe_fields_of_other_method(values, recipe, rest)
    return values


def _user_adapter_fields(overrides: list[str]) -> set[str]:
    """The `adapter.<field>` names the user sets (`adapter.x=`, `+adapter.x=`, `++adapter.x=`)."""
    keys = (item.split("=", 1)[0].lstrip("+") for item in overrides if "=" in item)
    return {key.split(".")[1] for key in keys if key.startswith("adapter.")}


def drop_recipe_fields_of_other_method(values: dict[str, Any], recipe: str, overrides: list[str]) -> None:
    """`recipe=R adapter=M` with M another method than R's: R's own `adapter:` fields that M's
    config does not have (e.g. prompt_tuning_init for LoRA) belong to R's method and are dropped.
    Fields the user sets are kept, so a misspelt override still fails; with R's own method nothing
    is dropped, so a misspelt recipe field fails too."""

    recipe_yaml = yaml.safe_load((resource_dir("recipes") / f"{recipe}.yaml").read_text()) or {}
    own = recipe_yaml.get("adapter") or {}
    adapter = values.get("adapter")
    defaults = [d["adapter"] for d in recipe_yaml.get("defaults", []) if isinstance(d, dict) and "adapter" in d]
    if not own or not isinstance(adapter, dict) or not defaults or adapter.get("method") not in available_methods():
        return
    group = yaml.safe_load((resource_dir("configs") / "adapter" / f"{defaults[0]}.yaml").read_text()) or {}
    if group.get("method") == adapter["method"]:
        return
    fields = set(get_method(adapter["method"]).config_cls.field_names())
    for key in set(own) - fields - _user_adapter_fields(overrides) - {"method"}:
        adapter.pop(key, None)


def compose_config(overrides: list[str] | None = None) -> RunConfig:
    """`peftctl train`'s argument list -> a validated RunConfig."""
    return build_run_config(compose_dict(overrides))


def config_to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config.to_dict()))
