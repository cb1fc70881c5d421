"""The key ceremony (密钥仪式): build a KEK from officers' components and seal a new key store with it.

Two ways in:

- ``generate``: fresh random components, one file per officer, each announced with its KCV, and the KEK's
  KCV announced to all; then the store's first keys are generated (issuer master keys of one suite,
  version 1, and the clearing service's SM2 pair).
- ``components``: the officers bring component files made earlier; each is checked against its KCV,
  the combination against the announced KEK KCV.

``demo=True`` loads the deterministic, public ``IssuerKeySet.demo()`` keys and a deterministic clearing
SM2 pair instead of random ones: for the simulator, the tests and ``carepay demo`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keys.components import (
    KeyComponent,
    combine,
    generate_components,
    kcv_hex,
    read_component_file,
    write_component_file,
)
from keys.issuer import PURPOSES, IssuerKeySet
from keys.sm2 import N, SM2KeyPair
from keys.sm3 import sm3
from keys.store import KeyInfo, KeyStore, KeyStoreError
from keys.suite import SM4, Suite

DEMO_SEED = "carepay-demo"


@dataclass
class CeremonyResult:
    """What the ceremony announces: component files and KCVs, the KEK KCV, the keys created. No key bytes."""

    store_path: Path
    kek_kcv: str
    components: list[tuple[int, str, str | None]] = field(default_factory=list)  # (index, kcv, file written)
    keys: list[KeyInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "store": str(self.store_path),
            "kek_kcv": self.kek_kcv,
            "components": [{"index": i, "kcv": k, "file": f} for i, k, f in self.components],
            "keys": [k.to_dict() for k in self.keys],
        }


def default_component_paths(store_path: str | Path, count: int) -> list[Path]:
    """``keystore.json`` → ``keystore.json.component1`` … (one file per officer)."""
    p = Path(store_path)
    return [p.with_name(f"{p.name}.component{i}") for i in range(1, count + 1)]


def demo_sm2_pair(name: str = "clearing", seed: str = DEMO_SEED) -> SM2KeyPair:
    """A deterministic, public SM2 pair for the demo and tests. Never for production."""
    d = int.from_bytes(sm3(f"{seed}|sm2|{name}".encode()), "big") % (N - 2) + 1
    return SM2KeyPair.from_private(d.to_bytes(32, "big"))


def populate_initial_keys(store: KeyStore, suite: Suite | str = SM4, demo: bool = False) -> None:
    """Version 1 of every issuer purpose and the clearing SM2 pair (random, or the public demo set)."""
    s = Suite.parse(suite)
    if demo:
        demo_set = IssuerKeySet.demo(seed=DEMO_SEED, suite=s)
        for purpose in PURPOSES:
            store.put_symmetric(purpose, demo_set.master(purpose, 1), s, version=1)
        store.put_sm2("clearing", demo_sm2_pair("clearing"))
    else:
        for purpose in PURPOSES:
            store.generate_symmetric(purpose, s)
        store.generate_sm2("clearing")


def run_ceremony(
    store_path: str | Path,
    count: int,
    component_files: Sequence[str | Path] = (),
    generate: bool = False,
    suite: Suite | str = SM4,
    demo: bool = False,
    expected_kek_kcv: str | None = None,
    initial_keys: bool = True,
) -> CeremonyResult:
    """Run the ceremony and return what is to be announced.

    ``generate``: ``component_files`` (or the default paths) are written, one per component; they must
    not exist. Otherwise ``component_files`` are read and checked.
    """
    store_path = Path(store_path)
    if store_path.exists():
        raise KeyStoreError(f"key store {store_path} already exists; refusing to overwrite")
    result = CeremonyResult(store_path=store_path, kek_kcv="")
    if generate:
        paths = [Path(f) for f in component_files] or default_component_paths(store_path, count)
        if len(paths) != count:
            raise KeyStoreError(f"{count} components need {count} component files, got {len(paths)}")
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            raise KeyStoreError(f"component file(s) already exist: {', '.join(existing)}")
        comps = generate_components(count)
        for comp, path in zip(comps, paths, strict=True):
            write_component_file(path, comp)
            result.components.append((comp.index, comp.kcv, str(path)))
    else:
        if len(component_files) != count:
            raise KeyStoreError(f"{count} components need {count} --component-file, got {len(component_files)}")
        comps = [read_component_file(f) for f in component_files]
        result.components = [(c.index, c.kcv, None) for c in comps]
    created = False
    try:
        kek = _kek(comps, expected_kek_kcv)
        result.kek_kcv = kcv_hex(kek)
        with KeyStore.create(store_path, kek) as store:
            created = True
            if initial_keys:
                populate_initial_keys(store, suite, demo)
            result.keys = store.list()
    except BaseException:
        written = [Path(f) for _, _, f in result.components if f]
        _undo([*written, store_path, store_path.with_name(store_path.name + ".lock")] if created else written)
        raise
    return result


def _kek(comps: Sequence[KeyComponent], expected_kek_kcv: str | None) -> bytes:
    return combine(comps, expected_kek_kcv)


def _undo(paths: list[Path]) -> None:
    """A failed ceremony leaves nothing behind: no half-filled store, no orphan component files."""
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
