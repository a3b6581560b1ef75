"""The fleet commands of the `zoedge` CLI: serve, device register, bundle publish / aggregate / pull, push, pull,
sync, patches list, patch replay / merge, as one typer app that zoedge.cli joins.

With --json the last stdout line is one JSON object. Errors are one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from zoedge.cli.errors import fail, one_line_errors

# Options that several commands share, defined once (typer copies an option's definition per command).
SERVER = typer.Option(..., help="Fleet server URL, e.g. http://127.0.0.1:8080")
ADMIN_TOKEN = typer.Option(..., help="The server's admin token")
JSON_OUT = typer.Option(False, "--json", help="Print one JSON object")
OUT_DIR = typer.Option(..., "--out", help="Directory to create (must not exist or be empty)")
TRAINED_ON = "The bundle the patch was trained on"


def _emit(result: dict[str, Any], json_out: bool, human: str) -> None:
    print(json.dumps(result) if json_out else human)


def _client(server: str, token: str):
    from zoedge.device.client import FleetClient

    return FleetClient(server, token)


@one_line_errors
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)"),
    port: int = typer.Option(8080, help="TCP port"),
    db: Optional[str] = typer.Option(None, "--db", help="Database URL (default: SQLite in --data-dir; "
                                                        "postgresql://user:pw@host/db)"),
    data_dir: Optional[Path] = typer.Option(None, help="Blobs, bundles, SQLite file (default: ./zoedge-data "
                                                       "or $ZOEDGE_DATA_DIR)"),
    admin_token: Optional[str] = typer.Option(None, help="Admin bearer token (default: $ZOEDGE_ADMIN_TOKEN, "
                                                         "else a random one, printed)"),
    read_token: Optional[str] = typer.Option(None, help="Read-only token for the dashboard and /metrics (default: "
                                                        "$ZOEDGE_READ_TOKEN; both also open with the admin token)"),
    auto_aggregate: Optional[int] = typer.Option(None, help="Average a round's patches into the next global patch "
                                                            "once this many devices uploaded (default: "
                                                            "$ZOEDGE_AUTO_AGGREGATE, 0 = off)"),
) -> None:
    """Run the fleet server (FastAPI + uvicorn): devices push patches, the admin publishes and aggregates."""
    try:
        import uvicorn

        from zoedge.server.app import create_app
        from zoedge.server.settings import Settings
    except ImportError as e:
        fail(f"`zoedge serve` needs the server extra ({e.name} is missing): pip install 'zoedge[server]'")
    overrides: dict[str, Any] = {}
    if db:
        overrides["database_url"] = db
    if data_dir:
        overrides["data_dir"] = data_dir
    if admin_token:
        overrides["admin_token"] = admin_token
    if read_token:
        overrides["read_token"] = read_token
    if auto_aggregate is not None:
        overrides["auto_aggregate"] = auto_aggregate
    settings = Settings(**overrides)
    if not settings.admin_token:
        settings.admin_token = secrets.token_urlsafe(24)
        print(f"zoedge: admin token (set --admin-token or ZOEDGE_ADMIN_TOKEN to choose it): "
              f"{settings.admin_token}", file=sys.stderr)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level="info")


@one_line_errors
def device_register(
    server: str = SERVER,
    admin_token: str = ADMIN_TOKEN,
    name: str = typer.Option(..., help="A name for the device"),
    json_out: bool = JSON_OUT,
) -> None:
    """Register a device; prints its id and bearer token (shown once)."""
    with _client(server, admin_token) as c:
        r = c.register_device(name)
    _emit({"device_id": r["device_id"], "token": r["token"]}, json_out,
          f"device {r['device_id']} ({name})\ntoken: {r['token']}")


@one_line_errors
def bundle_publish(
    bundle: Path = typer.Argument(..., help="Bundle directory"),
    server: str = SERVER,
    admin_token: str = ADMIN_TOKEN,
    json_out: bool = JSON_OUT,
) -> None:
    """Publish a bundle to the server (idempotent)."""
    with _client(server, admin_token) as c:
        r = c.publish_bundle(bundle)
    _emit({"bundle_id": r["bundle_id"], "sha256": r["sha256"], "bytes": r["bytes"]}, json_out,
          f"published bundle {r['bundle_id']} ({r['model_id']}, {r['bytes'] / 1e6:.1f} MB)")


@one_line_errors
def bundle_aggregate(
    bundle_id: str = typer.Argument(..., help="Bundle id (from `zoedge bundle publish`)"),
    patches: str = typer.Option(..., help="Comma-separated patch ids to average"),
    server: str = SERVER,
    admin_token: str = ADMIN_TOKEN,
    json_out: bool = JSON_OUT,
) -> None:
    """FedAvg device patches (weighted by their example counts) into the next global patch version."""
    ids = [p.strip() for p in patches.split(",") if p.strip()]
    with _client(server, admin_token) as c:
        r = c.aggregate(bundle_id, ids)
    _emit(r, json_out, f"global patch {r.get('patch_id')} version {r.get('version')} from {len(ids)} patches")


@one_line_errors
def push(
    patch: Path = typer.Argument(..., help="Patch directory (written by `zoedge train`)"),
    server: str = SERVER,
    token: str = typer.Option(..., help="This device's token"),
    format: str = typer.Option("adapter", "--format", help="adapter (the tensors) | trajectory "
                                                          "(a few KB; the server replays it) | coefficients "
                                                          "(a --seed-pool patch: 4 KB at K = 1024)"),
    outbox: Optional[Path] = typer.Option(None, help="Outbox directory (default: $ZOEDGE_OUTBOX or ~/.zoedge/outbox)"),
    bundle: Optional[str] = typer.Option(None, help="Store it for this bundle (id, unique prefix or local bundle "
                                                    "directory): the one it was trained on or a sibling (same base "
                                                    "and trainables, other quantization or format)"),
    json_out: bool = JSON_OUT,
) -> None:
    """Upload a patch (queued in the outbox first: if the server is unreachable, `zoedge sync` sends it later)."""
    from zoedge.device.outbox import Outbox

    with _client(server, token) as c:
        r = c.push(patch, format, Outbox(outbox), bundle_id_of(c, bundle) if bundle else None)
    _emit({"patch_id": r["patch_id"], "sha256": r["sha256"], "bytes": r["bytes"]}, json_out,
          f"pushed {patch} as patch {r['patch_id']} ({r['kind']}, {r['bytes']:,} bytes)")


BUNDLE_REF_HELP = "Bundle id (or a unique prefix of it), or a local bundle directory"


def bundle_id_of(client, ref: str) -> str:
    """The full id of a bundle named by a local bundle directory, an id or a unique id prefix."""
    if Path(ref).is_dir():
        from zoedge.manifest import Manifest

        return Manifest.load(ref).bundle_id
    return client.get_bundle(ref)["bundle_id"]


def latest_global_of(client, bundle: Optional[str]) -> dict[str, Any]:
    """The newest global patch of `bundle` (or of the only bundle with global patches)."""
    if bundle:
        bid = bundle_id_of(client, bundle)
        found = client.latest_global(bid)
        if found is None:
            fail(f"bundle {bid} has no global patch yet (the admin aggregates with `zoedge bundle aggregate`)")
        return found
    found = client.list_patches(kind="global")
    bundles = sorted({p["bundle_id"] for p in found})
    if not bundles:
        fail("the server has no global patch yet (the admin aggregates with `zoedge bundle aggregate`)")
    if len(bundles) > 1:
        fail(f"global patches exist for {len(bundles)} bundles ({', '.join(bundles[:3])}...): give --bundle")
    return max(found, key=lambda p: p["version"])


@one_line_errors
def pull(
    server: str = SERVER,
    token: str = typer.Option(..., help="This device's token"),
    patch_id: Optional[str] = typer.Option(None, "--patch", help="Patch id or a unique prefix of it (your own "
                                                                 "or a global one)"),
    latest_global: bool = typer.Option(False, "--latest-global", help="The newest global patch (of --bundle)"),
    bundle: Optional[str] = typer.Option(None, help=f"With --latest-global: {BUNDLE_REF_HELP} (default: the only "
                                                    "bundle with global patches)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="coefficients: of a seed-pool patch, only patch.json, "
                                                          "coefficients.npy and start.safetensors (a few KB)"),
    out: Path = OUT_DIR,
    json_out: bool = JSON_OUT,
) -> None:
    """Download a patch directory (--patch ID, or --latest-global), checked against its sha256."""
    if fmt not in (None, "coefficients"):
        fail(f"bad --format {fmt!r}: coefficients (or leave it out for the whole patch)")
    if bool(patch_id) == latest_global:
        fail("give --patch ID or --latest-global (one of them)")
    with _client(server, token) as c:
        if latest_global:
            patch_id = latest_global_of(c, bundle)["patch_id"]
        r = c.pull(patch_id, out, fmt)
    _emit({"patch_id": r["patch_id"], "out": str(out), "kind": r["kind"], "version": r["version"],
           "sha256": r["archive_sha256"]}, json_out, f"pulled patch {r['patch_id']} ({r['kind']}) into {out}")


@one_line_errors
def patches_list(
    server: str = SERVER,
    token: str = typer.Option(..., help="This device's token (its own and the global patches) or the admin's (all)"),
    bundle: Optional[str] = typer.Option(None, help=BUNDLE_REF_HELP),
    kind: Optional[str] = typer.Option(None, help="adapter | trajectory | coefficients | global"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object {\"patches\": [...]}"),
) -> None:
    """List the patches you can read, oldest first, with their full ids (for `zoedge pull --patch`)."""
    with _client(server, token) as c:
        rows = c.list_patches(bundle_id=bundle_id_of(c, bundle) if bundle else None, kind=kind)
    if json_out:
        print(json.dumps({"patches": rows}))
        return
    if not rows:
        print("no patches")
        return
    print(f"{'patch id':32}  {'kind':10}  {'version':>7}  {'bundle':12}  {'steps':>6}  {'examples':>8}  "
          f"{'accuracy':>8}  created")
    for p in rows:
        acc = (p.get("metrics") or {}).get("eval_accuracy")
        acc = f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"
        print(f"{p['patch_id']:32}  {p['kind']:10}  {p['version']:>7}  {p['bundle_id'][:12]:12}  {p['steps']:>6}  "
              f"{p['examples']:>8}  {acc:>8}  {p['created'][:19]}")


@one_line_errors
def bundle_pull(
    bundle_id: str = typer.Argument(..., help="Bundle id or a unique prefix of it"),
    server: str = SERVER,
    token: str = typer.Option(..., help="A device token or the admin token"),
    out: Path = OUT_DIR,
    json_out: bool = JSON_OUT,
) -> None:
    """Download a published bundle, checked against its sha256 and every file against the manifest."""
    with _client(server, token) as c:
        r = c.pull_bundle(bundle_id, out)
    _emit({"bundle_id": r["bundle_id"], "out": str(out), "sha256": r["sha256"], "bytes": r["bytes"]}, json_out,
          f"pulled bundle {r['bundle_id']} ({r['model_id']}, {r['bytes'] / 1e6:.1f} MB) into {out}")


@one_line_errors
def sync(
    server: str = SERVER,
    token: str = typer.Option(..., help="This device's token"),
    outbox: Optional[Path] = typer.Option(None, help="Outbox directory (default: $ZOEDGE_OUTBOX or ~/.zoedge/outbox)"),
    json_out: bool = JSON_OUT,
) -> None:
    """Send every patch queued in the outbox."""
    from zoedge.device.outbox import Outbox

    box = Outbox(outbox)
    with _client(server, token) as c:
        r = c.sync(box)
    summary = {"sent": [p["patch_id"] for p in r.sent], "failed": len(r.failed), "queued": len(box.entries())}
    _emit(summary, json_out, f"sent {len(r.sent)} patch(es), {summary['queued']} still queued")
    if r.failed:
        fail(f"{len(r.failed)} patch(es) not sent: {r.failed[0][1]}")


@one_line_errors
def patch_replay(
    patch: Path = typer.Argument(..., help="Patch directory with trajectory.npy (or a seed pool's coefficients.npy)"),
    bundle: Path = typer.Option(..., help=TRAINED_ON),
    out: Path = typer.Option(..., "--out", help="Directory to write the complete patch to (absent or empty)"),
    json_out: bool = JSON_OUT,
) -> None:
    """Rebuild a patch's adapter tensors from its trajectory (a seed-pool patch: from its coefficients, a global one
    too), offline (numpy only), bit-exactly. Refused unless
    the patch was made for this bundle (or a re-export of it with the same labels and trainables)."""
    from zoedge.manifest import Manifest
    from zoedge.patchdoc import PatchDoc
    from zoedge.runtime.patch import complete_patch_dir
    from zoedge.transfer import FORMAT_FILES

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out}: exists and is not an empty directory")
    PatchDoc.load(patch).check_fits(Manifest.load(bundle), str(patch))  # named by the user's path, not the copy's
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp) / "patch"
        work.mkdir()
        for name in FORMAT_FILES["trajectory" if PatchDoc.load(patch).seed_pool_k is None else "coefficients"]:
            if (patch / name).is_file():
                shutil.copyfile(patch / name, work / name)
        doc = complete_patch_dir(work, bundle)
        if out.exists():
            out.rmdir()
        os.rename(work, out)
    _emit({"out": str(out), "adapter_sha256": doc.adapter_sha256, "steps": doc.steps}, json_out,
          f"replayed {doc.steps} steps into {out} (adapter {doc.adapter_sha256[:12]} matches)")


@one_line_errors
def patch_merge(
    bundle: Path = typer.Argument(..., help=TRAINED_ON),
    patch: Path = typer.Argument(..., help="Patch directory (with adapter_model.safetensors)"),
    out: Path = typer.Option(..., "--out", help="Directory to write the merged bundle to (absent or empty)"),
    json_out: bool = JSON_OUT,
) -> None:
    """Bake a patch into a plain inference bundle (trained values as ONNX initializers, no trainable inputs) that
    `zoedge predict` runs without --patch. Needs the onnx package, which the device core lacks: pip install onnx
    (it is in the export extra)."""
    from zoedge.device.merge import merge_patch

    m = merge_patch(bundle, patch, out)
    _emit({"out": str(out), "bundle_id": m.bundle_id, "merged_from": m.merged_from}, json_out,
          f"merged {patch} into {out} (bundle {m.bundle_id}; run it with `zoedge predict {out} --data FILE`)")


app = typer.Typer()
app.command("serve")(serve)
app.command("push")(push)
app.command("pull")(pull)
app.command("sync")(sync)
device = typer.Typer(no_args_is_help=True, help="Devices of the fleet.")
device.command("register")(device_register)
bundles = typer.Typer(no_args_is_help=True, help="Bundles on the fleet server.")
bundles.command("publish")(bundle_publish)
bundles.command("aggregate")(bundle_aggregate)
bundles.command("pull")(bundle_pull)
patch = typer.Typer(no_args_is_help=True, help="Patches, offline: replay, merge (`zoedge patches list`: on the server).")
patch.command("replay")(patch_replay)
patch.command("merge")(patch_merge)
patches = typer.Typer(no_args_is_help=True, help="Patches on the fleet server.")
patches.command("list")(patches_list)
app.add_typer(device, name="device")
app.add_typer(bundles, name="bundle")
app.add_typer(patch, name="patch")
app.add_typer(patches, name="patches")
