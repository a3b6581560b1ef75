"""A human-readable summary of a bundle (used by `zoedge inspect`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from zoedge.manifest import Manifest, sha256_file


def describe(bundle_dir: str | Path) -> str:
    m = Manifest.load(bundle_dir)
    size = sum(p.stat().st_size for p in Path(bundle_dir).iterdir() if p.is_file())
    roles = Counter(t.role for t in m.trainables)
    lines = [
        f"bundle      {bundle_dir}  ({size / 1e6:.1f} MB, id {m.bundle_id}, schema {m.schema_version})",
        f"model       {m.model_id}  [{m.architecture} {m.kind}, {m.num_parameters:,} params]",
        f"base sha256 {m.base_sha256[:16]}...",
        f"task        {m.task}" + (f"  labels {m.labels}" if m.labels else ""),
    ]
    if m.prompt_template:
        lines.append(f"prompt      {m.prompt_template!r} -> label words {m.label_words} (token ids {m.label_token_ids})")
    if len(m.prompt_candidates) > 1:
        lines.append(f"            + {len(m.prompt_candidates) - 1} candidate template(s) the device may pick in training")
    if m.merged_from:
        lines.append(f"merged      patch {m.merged_from.get('patch_adapter_sha256', '')[:12]} "
                     f"({m.merged_from.get('patch_kind')}, version {m.merged_from.get('patch_version')}) into bundle "
                     f"{m.merged_from.get('bundle_id')}: an inference bundle, nothing to train")
    lines += [
        f"max length  {m.max_length} tokens ({m.padding_side} padding, {m.truncation_side} truncation)",
        f"trainable   {', '.join(m.trainable_kinds)}: {len(m.trainables)} tensors, {m.num_trainable:,} values "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(roles.items()))})" if m.trainables else "trainable   none",
    ]
    if m.lora:
        lines.append(f"lora        rank {m.lora.rank}, alpha {m.lora.alpha:g}, targets {m.lora.targets} -> {m.lora.target_modules}")
    lines += [
        f"quantized   {m.quantization}" + (f"  {m.quantization_details.get('method', '')}" if m.quantization_details else ""),
        f"target      {m.target}; providers {' > '.join(p['name'] for p in m.providers)}",
        f"inputs      {', '.join(f'{i.name}{i.shape}' for i in m.inputs)}" + (" + trainables" if m.trainables else ""),
        f"outputs     {', '.join(f'{o.name}{o.shape}' for o in m.outputs)}",
        "files       " + ", ".join(f"{k} ({v[:8]})" for k, v in m.files.items()),
    ]
    return "\n".join(lines)


def file_problems(bundle_dir: str | Path) -> list[str]:
    """Every file the manifest lists that is missing or does not match its sha256 (empty: the bundle is whole)."""
    m = Manifest.load(bundle_dir)
    out = []
    for name, digest in m.files.items():
        p = Path(bundle_dir) / name
        if not p.is_file():
            out.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            out.append(f"{name} does not match its sha256 (corrupt or edited)")
    return out
