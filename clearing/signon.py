"""Sign-on (签到) on the host: the terminal proves itself with SM2 over a host nonce, receives working keys.

Exchange (every message MAC'd under the terminal's TMK, since no TAK exists yet):

1. terminal → ``sign_on`` with an empty ``host_nonce``;
2. host → ``sign_on_challenge`` with a fresh nonce;
3. terminal → ``sign_on`` with that nonce and an SM2 signature over
   ``SignOn.signed_bytes()`` (``carepay-sign-on|<terminal_id>|<nonce>``);
4. host → ``sign_on_ok``: TAK and TEK encrypted under the TMK (SM4 ECB) with
   their KCVs and the new key version.

The nonce is stateless so that step 3 may reach a different worker than step 1:
``ts_ms(8) ‖ random(8) ‖ SM3(WKM ‖ terminal_id ‖ ts ‖ random)[:16]``; a worker
checks the tag and the age (``SIGN_ON_NONCE_TTL_S``), and the working-key row
remembers the last nonce used so a replayed sign-on does not rotate keys again.
"""

from __future__ import annotations

import hmac
import inspect
import os
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.terminal_keys import TerminalKeySource, WorkingKeys
from keys.diversify import kcv
from keys.sm2 import verify as sm2_verify
from keys.sm3 import sm3
from keys.suite import SM4, encrypt_ecb
from protocol.messages import RC, Message, SignOn, SignOnChallenge, SignOnOk, now_utc

SIGN_ON_NONCE_TTL_S = 60
NONCE_RANDOM_BYTES = 8
NONCE_TAG_BYTES = 16


class SignOnService:
    """Answers ``sign_on`` messages; shares state with other workers only through the database."""

    def __init__(self, key_source: TerminalKeySource, working_keys: WorkingKeys, wkm: bytes,
                 engine: AsyncEngine | None = None) -> None:
        self._keys = key_source
        self._working = working_keys
        self._wkm = wkm
        self._engine = engine  # the registry: the provider a terminal is bound to goes back in the answer

    async def _provider(self, terminal_id: str) -> tuple[str, str]:
        """(provider id, provider name) the registry binds ``terminal_id`` to; empty without a registry."""
        if self._engine is None:
            return "", ""
        from clearing.schema import providers, terminals

        async with self._engine.connect() as conn:
            row = (await conn.execute(
                sa.select(providers.c.provider_id, providers.c.name)
                .join(terminals, terminals.c.provider_id == providers.c.provider_id)
                .where(terminals.c.terminal_id == terminal_id))).first()
        return (row[0], row[1]) if row else ("", "")

    def __repr__(self) -> str:
        return "SignOnService(<keys hidden>)"

    def _nonce_tag(self, terminal_id: str, head: bytes) -> bytes:
        return sm3(b"carepay|sign-on-nonce|" + self._wkm + terminal_id.encode() + head)[:NONCE_TAG_BYTES]

    def new_nonce(self, terminal_id: str) -> str:
        head = int(time.time() * 1000).to_bytes(8, "big") + os.urandom(NONCE_RANDOM_BYTES)
        return (head + self._nonce_tag(terminal_id, head)).hex().upper()

    def nonce_ok(self, terminal_id: str, nonce_hex: str) -> bool:
        try:
            raw = bytes.fromhex(nonce_hex)
        except ValueError:
            return False
        if len(raw) != 8 + NONCE_RANDOM_BYTES + NONCE_TAG_BYTES:
            return False
        head, tag = raw[:-NONCE_TAG_BYTES], raw[-NONCE_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._nonce_tag(terminal_id, head)):
            return False
        age_s = time.time() - int.from_bytes(head[:8], "big") / 1000
        return -5 <= age_s <= SIGN_ON_NONCE_TTL_S

    async def handle(self, msg: SignOn) -> Message | None:
        """The answer to one sign-on step, MAC'd under the TMK; None for an unknown terminal or a bad TMK MAC."""
        tmk = self._keys.tmk(msg.terminal_id)
        if tmk is None or not msg.mac_ok(tmk):
            return None  # cannot answer in a way the sender could trust; the worker counts it
        common = {"terminal_id": msg.terminal_id, "msg_id": uuid.uuid4().hex, "sent_at": now_utc(),
                  "orig_msg_id": msg.msg_id}
        if not msg.host_nonce:
            return SignOnChallenge(host_nonce=self.new_nonce(msg.terminal_id), **common).signed(tmk)

        def refuse(code: str, why: str) -> Message:
            return SignOnOk(response_code=code, message=why, **common).signed(tmk)

        if not self.nonce_ok(msg.terminal_id, msg.host_nonce):
            return refuse(RC.INVALID_TXN, "sign-on nonce invalid or expired")
        pub = self._keys.sm2_public_key(msg.terminal_id)
        if inspect.isawaitable(pub):  # the registry-backed source reads the database
            pub = await pub
        try:
            signature = bytes.fromhex(msg.signature)
        except ValueError:
            signature = b""
        if pub is None or not sm2_verify(pub, msg.signed_bytes(), signature):
            return refuse(RC.SUSPECTED_FRAUD, "sign-on signature invalid")
        rotated = await self._working.rotate(msg.terminal_id, msg.host_nonce)
        if rotated is None:
            return refuse(RC.DUPLICATE, "sign-on nonce already used")
        version, tak, tek = rotated
        provider_id, provider_name = await self._provider(msg.terminal_id)
        return SignOnOk(
            provider_id=provider_id,
            provider_name=provider_name[:128],
            response_code=RC.APPROVED,
            tak_under_tmk=encrypt_ecb(tmk, tak, SM4).hex().upper(),
            tek_under_tmk=encrypt_ecb(tmk, tek, SM4).hex().upper(),
            tak_kcv=kcv(tak, SM4).hex().upper(),
            tek_kcv=kcv(tek, SM4).hex().upper(),
            key_version=version,
            **common,
        ).signed(tmk)
