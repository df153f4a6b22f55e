"""`peftctl export --format ollama`: the merged model as GGUF plus a Modelfile for `ollama create`.

The Modelfile's TEMPLATE is the prompt the run was trained on (alpaca, the tokenizer's chat
template, or plain text), written as an Ollama (Go) template: the run's own prompt formatting is
applied to a marker and split around it, so the template reproduces exactly the training prompt.
Stops: the end-of-sequence token (and alpaca's next `### Instruction:` header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftctl.errors import ConfigError

MARKER = "\x00PEFTCTL_PROMPT\x00"
ALPACA_NEXT_TURN = "### Instruction:"


def go_template(dataset_cfg: Any, tokenizer: Any) -> str:
    """The run's prompt format as an Ollama template ({{ .Prompt }}, then {{ .Response }})."""
    from peftctl.eval.generate import format_prompt

    rendered = format_prompt(MARKER, dataset_cfg, tokenizer)
    if rendered.count(MARKER) != 1:
        raise ConfigError(
            f"--format ollama: the run's prompt format (dataset.format={dataset_cfg.format}) "
            "does not place the prompt once"
        )
    before, after = rendered.split(MARKER)
    if "{{" in before + after or '"""' in before + after:
        raise ConfigError(
            "--format ollama: the prompt format contains '{{' or '\"\"\"', which a Modelfile template cannot hold"
        )
    return f"{before}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}"


def stop_sequences(dataset_cfg: Any, tokenizer: Any) -> list[str]:
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    if dataset_cfg.format == "alpaca":
        stops.append(ALPACA_NEXT_TURN)
    return stops


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(
    gguf_name: str, dataset_cfg: Any, tokenizer: Any, context_length: int, generation_config: Any = None
) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(dataset_cfg, tokenizer)}"""']
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stop_sequences(dataset_cfg, tokenizer)]
    lines.append(f"PARAMETER num_ctx {context_length}")
    # the model's own sampling defaults when it has them; greedy (as peftctl generate's default) otherwise
    do_sample = bool(getattr(generation_config, "do_sample", False))
    lines.append(
        f"PARAMETER temperature {float(getattr(generation_config, 'temperature', 1.0) or 1.0) if do_sample else 0.0:g}"
    )
    if do_sample and getattr(generation_config, "top_p", None) is not None:
        lines.append(f"PARAMETER top_p {float(generation_config.top_p):g}")
    return "\n".join(lines) + "\n"


def export_ollama(
    path: str | Path,
    out: str | Path,
    outtype: str = "auto",
    quiet: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """OUT/model-<outtype>.gguf + OUT/Modelfile, written together (atomically)."""
    from peftctl.export.gguf_export import (
        check_outtype,
        check_source,
        check_supported,
        require_gguf,
        resolve_outtype,
        write_gguf,
    )
    from peftctl.export.merge import merged_model
    from peftctl.export.target import check_output_target, source_paths
    from peftctl.utils import atomic_directory, atomic_write_text, check_output_path

    require_gguf()
    check_outtype(outtype)
    check_source(path, trust_remote_code)
    check_output_path(out, "--out", directory=False)  # a name the file system takes, a writable parent
    check_output_target(out, source_paths(path), overwrite)
    merged, tokenizer, source, note = merged_model(path, quiet=True, trust_remote_code=trust_remote_code)
    check_supported(merged)
    resolved = resolve_outtype(outtype, merged)
    name = f"model-{resolved}.gguf"
    text = modelfile_text(
        name,
        source.config.dataset,
        tokenizer,
        int(merged.config.max_position_embeddings),
        getattr(merged, "generation_config", None),
    )
    with atomic_directory(Path(out), overwrite=True) as tmp:  # checked above
        write_gguf(merged, tokenizer, tmp / name, resolved, name=Path(path).resolve().name)
        atomic_write_text(tmp / "Modelfile", text)
    if not quiet:
        print(
            f"Ollama model written to {out} (GGUF {resolved} + Modelfile{note}); "
            f"run: ollama create NAME -f {Path(out) / 'Modelfile'}"
        )
    return Path(out)
