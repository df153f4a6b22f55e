"""`peftctl export`: the adapter in PEFT format, the merged model, or the merged model as GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftctl.errors import ConfigError
from peftctl.export.merge import merge
from peftctl.export.target import check_output_target, source_paths
from peftctl.runs import open_source
from peftctl.utils import atomic_directory, check_output_path

FORMATS = ("peft", "merged", "gguf", "gguf-lora", "ollama")
GGUF_FORMATS = ("gguf", "gguf-lora", "ollama")  # the formats --outtype applies to


def export(
    path: str | Path,
    format: str,
    out: str | Path,
    quiet: bool = False,
    outtype: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: str | None = None,
) -> Path:
    """Write PATH's adapter (peft), merged model (merged) or GGUF file (gguf) to OUT; an existing
    non-empty OUT (or .gguf file) is replaced only with ``overwrite``, the source never."""
    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not valid; expected one of {', '.join(FORMATS)}")
    if outtype is not None and format not in GGUF_FORMATS:
        raise ConfigError("--outtype applies to --format gguf only (and gguf-lora / ollama, which write GGUF files)")
    if max_shard_size is not None and format != "merged":
        raise ConfigError("--max-shard-size applies to --format merged only")
    if format == "gguf-lora":
        from peftctl.export.gguf_lora import export_gguf_lora

        return export_gguf_lora(
            path, out, outtype, quiet=quiet, overwrite=overwrite, trust_remote_code=trust_remote_code
        )
    if format == "gguf":
        from peftctl.export.gguf_export import export_gguf

        return export_gguf(
            path, out, outtype or "auto", quiet=quiet, overwrite=overwrite, trust_remote_code=trust_remote_code
        )
    if format == "ollama":
        from peftctl.export.ollama import export_ollama

        return export_ollama(
            path, out, outtype or "auto", quiet=quiet, overwrite=overwrite, trust_remote_code=trust_remote_code
        )
    if format == "merged":
        command = [
            "peftctl",
            "export",
            str(path),
            "--format",
            "merged",
            "--out",
            str(out),
            *(["--max-shard-size", max_shard_size] if max_shard_size else []),
        ]
        return merge(
            path,
            out,
            quiet=quiet,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            max_shard_size=max_shard_size,
            command=command,
        )
    check_output_path(out, "--out", directory=False)  # a name the file system takes, a writable parent
    check_output_target(out, source_paths(path), overwrite)  # an existing file or folder only with --overwrite
    source = open_source(path, trust_remote_code=trust_remote_code)
    with atomic_directory(Path(out), overwrite=True) as tmp:  # checked above
        for file in source.adapter_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
    _warn_for_vllm(Path(out))
    if not quiet:
        print(f"adapter (PEFT format) written to {out}")
    return Path(out)


def _warn_for_vllm(adapter_dir: Path) -> None:
    """One warning line (stderr) per feature vLLM's LoRA loader refuses."""
    import json
    import sys

    from peftctl.export.vllm_check import vllm_warnings

    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        for line in vllm_warnings(json.loads(config_file.read_text())):
            print(f"warning: {line}", file=sys.stderr, flush=True)
