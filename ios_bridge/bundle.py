"""`python -m ios_bridge.bundle --artifacts DIR --out DIR`: a Core ML or Core AI export as the folder an Xcode
target takes as it is (add it to the target as a folder reference; MiniCPMKit's `Manifest.load` reads it).

The bundle holds exactly what the manifest lists (packages or assets, `token_embedding.bin`, config and
tokenizer files) plus `manifest.json` and a `README.md` that says what each file is, the memory the model needs
and the minimum OS. Every hash is verified before anything is copied, the copy is verified again, and the
folder is written beside `--out` and renamed when complete. `export.coreml` and `export.coreai` write the same
README into their own output, so an export directory is already a bundle; this command re-checks and copies one
(e.g. out of a build tree into an app project).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from minicpm.errors import UserError
from runtime.cli import run
from runtime.manifest import read_manifest

APPLE_FORMATS = {"coreml": "Core ML", "coreai": "Core AI"}
MINIMUM_OS = {"iOS18": "iOS 18 / iPadOS 18 / macOS 15", "macOS15": "macOS 15",
              "coreai": "iOS 27 / iPadOS 27 / macOS 27"}
FILE_ROLES = {"config.json": "model config", "generation_config.json": "stop ids", "preprocessor_config.json":
              "image placeholder tokens", "chat_template.jinja": "the checkpoint's chat template (the manifest's "
              "prompt section holds it as data)"}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _state_bytes(manifest: dict) -> int:
    """Bytes of one conversation's KV cache (Core ML / Core AI state: every layer's keys and values)."""
    fmt = manifest["format"]
    state = manifest["schedule"][fmt]["state"]
    count = 1
    for d in state["shape"]:
        count *= d
    return count * len(state["names"]) * (2 if state["dtype"] == "float16" else 4)


def minimum_os(manifest: dict) -> str:
    if manifest["format"] == "coreml":
        target = manifest["schedule"]["coreml"]["target"]
        return MINIMUM_OS.get(target, target)
    return MINIMUM_OS["coreai"]


def readme(manifest: dict) -> str:
    """The bundle's README.md: the files, memory and OS facts an app developer needs, from the manifest."""
    fmt, model, schedule = manifest["format"], manifest["model"], manifest["schedule"]
    artifacts, quant = manifest["artifacts"], manifest["quantization"]
    weights = sum(a["size"] for k, a in artifacts.items() if k != "token_embedding")
    table, state = artifacts["token_embedding"]["size"], _state_bytes(manifest)
    steps = schedule["steps"]
    uses = {}
    for name, step in steps.items():
        uses.setdefault(step["artifact"], []).append(f"{name} step: function `{step.get('function', 'main')}`")
    lines = [
        f"# {model['variant']} for {APPLE_FORMATS[fmt]} (MiniCPMKit bundle)",
        "",
        f"Exported by {manifest['generator']} from `{model.get('source', '?')}`; quantisation "
        f"{quant['method']}" + (f" (group {quant['group_size']})" if quant.get("group_size") else "") + ".",
        "Add this folder to your Xcode target as a folder reference and open it with MiniCPMKit "
        "(`Manifest.load(directory:)` verifies every file's sha256 before anything loads).",
        "",
        "| file | what it is | size |",
        "|---|---|---|",
    ]
    for key, entry in artifacts.items():
        what = "token embedding table, raw little-endian " + f"{entry['dtype']} {entry['shape']}, memory-mapped " \
            "by the host" if key == "token_embedding" else ", ".join(uses.get(key, [key]))
        lines.append(f"| `{entry['path']}` | {what} | {_human(entry['size'])} |")
    for entry in manifest["files"]:
        lines.append(f"| `{entry['path']}` | {FILE_ROLES.get(entry['path'], 'tokenizer')} | {_human(entry['size'])} |")
    lines += [
        "| `manifest.json` | what every file is, its sha256, and the schedule the runtime runs | - |",
        "",
        f"Minimum OS: {minimum_os(manifest)}.",
        "",
        f"Memory: about {_human(weights + table + state)} resident: weights {_human(weights)}, the embedding "
        f"table {_human(table)} (memory-mapped: only the rows used are paged in) and one conversation's KV cache "
        f"{_human(state)} ({schedule['max_context']} tokens of context), plus activations (largest during a "
        f"prefill chunk of {schedule['prefill_chunk']} tokens and a vision call).",
        "",
    ]
    return "\n".join(lines)


def write_readme(directory: Path, manifest: dict) -> None:
    """README.md beside manifest.json (not listed in the manifest: the runtime ignores it)."""
    (directory / "README.md").write_text(readme(manifest))


def bundle(artifacts: Path, out: Path) -> Path:
    """Verify the export in `artifacts`, copy what its manifest lists into `out` (staged, then renamed) and verify
    the copy."""
    from export.bundle import staged_directory  # noqa: PLC0415

    manifest = read_manifest(artifacts)  # schema, paths and every sha256 checked
    if manifest["format"] not in APPLE_FORMATS:
        raise UserError(f"{artifacts}: this is an {manifest['format']} export; the Xcode bundle takes Core ML or "
                        "Core AI exports (python -m export.coreml / export.coreai)")
    if out.resolve() == artifacts.resolve():
        raise UserError("--out must differ from --artifacts")
    paths = [a["path"] for a in manifest["artifacts"].values()] + [f["path"] for f in manifest["files"]]
    with staged_directory(out) as staged:
        for relative in [*paths, "manifest.json"]:
            source, target = artifacts / relative, staged / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        read_manifest(staged)  # the copy verifies too
        write_readme(staged, manifest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ios_bridge.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="a Core ML or Core AI export directory")
    parser.add_argument("--out", required=True, help="the bundle folder (replaced when complete)")
    args = parser.parse_args(argv)
    out = bundle(Path(args.artifacts), Path(args.out))
    manifest = read_manifest(out)
    print(f"bundle: {out} ({APPLE_FORMATS[manifest['format']]}, {manifest['model']['variant']}, "
          f"{len(manifest['artifacts'])} artifacts, minimum OS {minimum_os(manifest)}); see {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    run(main)
