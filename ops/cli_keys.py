"""CLI verbs: ``carepay keys …`` — crypto helpers (kcv, mac, diversify) and the key officers' work on the key store.

Hex in, hex out, upper case. Bad hex or a wrong length is one line on stderr and exit 2.
The KEK for ``list``/``rotate``/``zeroize``/``add`` comes from the officers' component files:
``--component-file`` repeated, or ``CAREPAY_KEY_COMPONENTS`` (comma-separated paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from keys.ceremony import run_ceremony
from keys.components import ComponentError
from keys.diversify import FACTOR_BYTES, diversify_path, kcv
from keys.mac import pboc_mac
from keys.store import ENV_COMPONENTS, ENV_STORE_PATH, ISSUER_GROUP, KeyInfo, KeyStore, KeyStoreError
from keys.suite import CryptoError, Suite
from ops.errors import BadInput, CarepayError

MAX_MAC_DATA_BYTES = 64 * 1024
MAX_FACTOR_BYTES = 16
MAX_DIVERSIFY_LEVELS = 4
TABLE_WIDTH_CHARS = 120
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")

keys_app = typer.Typer(
    help="Keys: check values, MACs, diversification, and the key officers' ceremony, rotation and zeroisation.\n\n"
    "Example:\n\n  carepay keys kcv --suite sm4 0123456789ABCDEFFEDCBA9876543210",
    no_args_is_help=True,
)

SuiteOpt = typer.Option("sm4", "--suite", help="Crypto suite: sm4 (default) or 3des.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document instead of text.")
StoreOpt = typer.Option(..., "--store", envvar=ENV_STORE_PATH, help="Key store file (or $CAREPAY_KEYSTORE_PATH).")
ComponentsOpt = typer.Option(
    None, "--component-file",
    help=f"An officer's component file; repeat for each (or ${ENV_COMPONENTS}=a,b[,c]).",
)


def register(app: typer.Typer) -> None:
    """Add this module's verbs to the top-level app."""
    app.add_typer(keys_app, name="keys")


# --- input parsing


def parse_suite(value: str) -> Suite:
    try:
        return Suite.parse(value)
    except CryptoError as exc:
        raise BadInput(str(exc)) from None


def parse_hex(value: str, what: str, lengths: tuple[int, ...] | None = None, max_bytes: int | None = None) -> bytes:
    """Hex (spaces allowed) to bytes; BadInput naming ``what`` — never echoing the value, which may be a key."""
    compact = "".join(value.split())
    if not _HEX.fullmatch(compact):
        raise BadInput(f"{what}: not an even number of hex digits")
    raw = bytes.fromhex(compact)
    if lengths is not None and len(raw) not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise BadInput(f"{what}: must be {want} bytes, got {len(raw)}")
    if max_bytes is not None and len(raw) > max_bytes:
        raise BadInput(f"{what}: at most {max_bytes} bytes, got {len(raw)}")
    return raw


def _key_lengths(suite: Suite, for_mac: bool = False) -> tuple[int, ...]:
    if suite is Suite.SM4:
        return (16,)
    return (8, 16) if for_mac else (16, 24)


@contextlib.contextmanager
def crypto_input() -> Iterator[None]:
    """A CryptoError from a primitive (a length the checks above did not cover) is the user's bad input."""
    try:
        yield
    except CryptoError as exc:
        raise BadInput(str(exc)) from None


def _emit(as_json: bool, doc: dict, text: str) -> None:
    typer.echo(json.dumps(doc) if as_json else text)


# --- crypto helpers


@keys_app.command("kcv")
def kcv_cmd(
    key_hex: str = typer.Argument(..., metavar="KEYHEX", help="The key, hex."),
    suite: str = SuiteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Print the key check value (KCV, 密钥校验值): the first 3 bytes of the cipher over a zero block.

    Example: carepay keys kcv --suite sm4 0123456789ABCDEFFEDCBA9876543210
    """
    s = parse_suite(suite)
    key = parse_hex(key_hex, "KEYHEX", _key_lengths(s))
    with crypto_input():
        value = kcv(key, s).hex().upper()
    _emit(as_json, {"suite": s.value, "kcv": value}, value)


@keys_app.command("mac")
def mac_cmd(
    key_hex: str = typer.Option(..., "--key", help="MAC key, hex (sm4: 16 bytes; 3des: 8 or 16)."),
    data_hex: str = typer.Option(..., "--data", help="Data, hex (may be empty)."),
    iv_hex: str = typer.Option(None, "--iv", help="IV or card challenge, hex; right-padded with zeros."),
    suite: str = SuiteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Print the 4-byte PBOC MAC: pad 80 00.., CBC from the IV, leftmost 4 bytes (16-byte 3DES key: retail MAC).

    Example: carepay keys mac --suite 3des --key 003238ABC57659DD --data 000010000600112233445520120229135100
    """
    s = parse_suite(suite)
    key = parse_hex(key_hex, "--key", _key_lengths(s, for_mac=True))
    data = parse_hex(data_hex, "--data", max_bytes=MAX_MAC_DATA_BYTES)
    iv = parse_hex(iv_hex, "--iv", max_bytes=s.block_bytes) if iv_hex is not None else None
    with crypto_input():
        value = pboc_mac(key, data, iv, s).hex().upper()
    _emit(as_json, {"suite": s.value, "mac": value}, value)


@keys_app.command("diversify")
def diversify_cmd(
    key_hex: str = typer.Option(..., "--key", help="Master key, hex (16 bytes)."),
    factors: list[str] = typer.Option(..., "--factor", help="Diversification factor, hex (8 bytes; a longer one "
                                      "uses its rightmost 8). Repeat for several levels, highest first."),
    suite: str = SuiteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Print the derived key (密钥分散): sm4 SM4(MK, D‖~D); 3des 3DES(MK, D)‖3DES(MK, ~D); levels in turn.

    Example: carepay keys diversify --suite sm4 --key 0123456789ABCDEFFEDCBA9876543210 --factor 1234567890ABCDEF
    """
    s = parse_suite(suite)
    key = parse_hex(key_hex, "--key", (16,))
    if len(factors) > MAX_DIVERSIFY_LEVELS:
        raise BadInput(f"--factor: at most {MAX_DIVERSIFY_LEVELS} levels")
    parsed = [parse_hex(f, f"--factor #{i + 1}", tuple(range(FACTOR_BYTES, MAX_FACTOR_BYTES + 1)))
              for i, f in enumerate(factors)]
    with crypto_input():
        value = diversify_path(key, parsed, s).hex().upper()
    _emit(as_json, {"suite": s.value, "key": value}, value)


# --- key officers' verbs


def _component_files(files: list[Path] | None) -> list[Path]:
    if files:
        return list(files)
    env = [f.strip() for f in os.environ.get(ENV_COMPONENTS, "").split(",") if f.strip()]
    if not env:
        raise BadInput(f"the KEK needs the officers' components: --component-file (repeat) or ${ENV_COMPONENTS}")
    return [Path(f) for f in env]


def _open(store: Path, files: list[Path] | None) -> KeyStore:
    try:
        return KeyStore.from_components(store, _component_files(files))
    except ComponentError as exc:
        raise BadInput(str(exc)) from None
    except KeyStoreError as exc:
        raise CarepayError(str(exc)) from None


def _keys_table(title: str, infos: list[KeyInfo]) -> Table:
    table = Table(title=title)
    for col in ("purpose", "version", "kind", "suite", "kcv", "status", "created_at"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.purpose, str(i.version), i.kind, i.suite, i.kcv, i.status, i.created_at)
    return table


@keys_app.command("ceremony")
def ceremony_cmd(
    store: Path = typer.Option(..., "--store", help="The new key store file (must not exist)."),
    components: int = typer.Option(2, "--components", min=2, max=3, help="Number of KEK components: 2 or 3."),
    component_files: list[Path] = typer.Option(None, "--component-file", help="Component file, one per officer: "
                                               "written with --generate, else read."),
    generate: bool = typer.Option(False, "--generate", help="Generate fresh components and write one file each."),
    suite: str = SuiteOpt,
    demo: bool = typer.Option(False, "--demo", help="Load the public deterministic demo keys (simulator, tests)."),
    kek_kcv: str = typer.Option(None, "--kek-kcv", help="The KEK KCV announced at the ceremony, to check."),
    empty: bool = typer.Option(False, "--empty", help="Create the store without initial keys."),
    as_json: bool = JsonOpt,
) -> None:
    """Key ceremony (密钥仪式): build the KEK from 2 or 3 components and create a new key store.

    With --generate, components are generated, written to separate files for the officers (default
    STORE.component1 …) and printed with their KCVs; otherwise they are read from --component-file.
    The store gets version 1 of every issuer master key and the clearing SM2 pair (--empty: none).

    Examples:

      carepay keys ceremony --store ks.json --components 2 --generate

      carepay keys ceremony --store ks.json --components 2 --component-file a.json --component-file b.json

      carepay keys ceremony --store demo-ks.json --demo
    """
    s = parse_suite(suite)
    if demo and not component_files:
        generate = True
    if not generate and not component_files:
        raise BadInput("give --component-file for each component, or --generate")
    if component_files and len(component_files) != components:
        raise BadInput(f"--components {components} needs {components} --component-file, got {len(component_files)}")
    if kek_kcv is not None and not re.fullmatch(r"[0-9A-Fa-f]{6}", kek_kcv):
        raise BadInput("--kek-kcv: 6 hex digits")
    try:
        result = run_ceremony(store, components, component_files or (), generate=generate, suite=s, demo=demo,
                              expected_kek_kcv=kek_kcv, initial_keys=not empty)
    except ComponentError as exc:
        raise BadInput(str(exc)) from None
    except KeyStoreError as exc:
        raise CarepayError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "demo": demo}))
        return
    console = Console(width=TABLE_WIDTH_CHARS)
    console.print(f"key store {result.store_path} created{' with the PUBLIC DEMO keys' if demo else ''}")
    for index, comp_kcv, path in result.components:
        where = f" -> {path} (hand to officer {index} only)" if path else ""
        console.print(f"component {index}/{components} KCV {comp_kcv}{where}")
    console.print(f"KEK KCV {result.kek_kcv}")
    if result.keys:
        console.print(_keys_table("keys", result.keys))


@keys_app.command("list")
def list_cmd(
    store: Path = StoreOpt,
    component_files: list[Path] = ComponentsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List the keys in the store: purpose, version, suite, KCV, status — never the keys.

    Example: carepay keys list --store ks.json --component-file a.json --component-file b.json --json
    """
    ks = _open(store, component_files)
    infos = ks.list()
    if as_json:
        typer.echo(json.dumps({"store": str(store), "kek_kcv": ks.kek_kcv, "keys": [i.to_dict() for i in infos]}))
        return
    Console(width=TABLE_WIDTH_CHARS).print(_keys_table(f"{store} (KEK KCV {ks.kek_kcv})", infos))


@keys_app.command("rotate")
def rotate_cmd(
    purpose: str = typer.Option(..., "--purpose", help="issuer (all issuer master keys), an issuer purpose, "
                                "tmk:<terminal id>, sm2:clearing or sm2:<terminal id>."),
    store: Path = StoreOpt,
    component_files: list[Path] = ComponentsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Rotate a key to a new version; the old version is retired but stays usable (old-version cards keep working).

    Example: carepay keys rotate --store ks.json --purpose issuer --component-file a.json --component-file b.json
    """
    ks = _open(store, component_files)
    try:
        version = ks.rotate(purpose)
    except KeyStoreError as exc:
        raise BadInput(str(exc)) from None
    new = [i for i in ks.list() if i.version == version and (
        i.purpose == purpose or (purpose == ISSUER_GROUP and i.kind == "symmetric" and ":" not in i.purpose))]
    _emit(as_json, {"purpose": purpose, "version": version, "keys": [i.to_dict() for i in new]},
          "\n".join(f"{i.purpose} version {i.version} KCV {i.kcv}" for i in new))


@keys_app.command("add")
def add_cmd(
    purpose: str = typer.Option(..., "--purpose", help="tmk:<terminal id> or sm2:<terminal id> (or any purpose "
                                "not yet in the store)."),
    store: Path = StoreOpt,
    component_files: list[Path] = ComponentsOpt,
    suite: str = SuiteOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Generate the first key for a purpose, e.g. a terminal's master key (TMK) or SM2 pair at installation.

    Example: carepay keys add --store ks.json --purpose tmk:T0000001 --component-file a.json --component-file b.json
    """
    s = parse_suite(suite)
    ks = _open(store, component_files)
    try:
        if any(i.purpose == purpose for i in ks.list()):
            raise BadInput(f"{purpose} already in the store; use keys rotate")
        version = ks.generate_sm2(purpose) if purpose.startswith("sm2:") else ks.generate_symmetric(purpose, s)
    except KeyStoreError as exc:
        raise BadInput(str(exc)) from None
    info = ks.info(purpose, version)
    _emit(as_json, info.to_dict(), f"{info.purpose} version {info.version} KCV {info.kcv}")


@keys_app.command("zeroize")
def zeroize_cmd(
    store: Path = StoreOpt,
    purpose: str = typer.Option(None, "--purpose", help="Only this purpose (all versions); 'issuer' for all issuer "
                                "master keys. Default: every key."),
    yes: bool = typer.Option(False, "--yes", help="Confirm: the keys are destroyed for good."),
    component_files: list[Path] = ComponentsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Zeroise (销毁) keys: overwrite the material, mark it zeroized, rewrite the file.

    Example: carepay keys zeroize --store ks.json --purpose tmk:T0000001 --yes --component-file a.json --component-file b.json
    """
    if not yes:
        raise BadInput("zeroize destroys keys for good: add --yes")
    ks = _open(store, component_files)
    try:
        done = ks.zeroize(purpose)
    except KeyStoreError as exc:
        raise BadInput(str(exc)) from None
    _emit(as_json, {"zeroized": [i.to_dict() for i in done]},
          "\n".join(f"zeroized {i.purpose} version {i.version} (KCV {i.kcv})" for i in done) or "nothing to zeroize")
