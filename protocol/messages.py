"""Host messages between terminal and clearing (终端 ↔ 主机), carried as JSON over MQTT.

Every message has ``type``, ``terminal_id``, ``msg_id``, ``sent_at`` and a ``mac``
over its canonical bytes: the JSON of all other fields, keys sorted, no spaces,
UTF-8. The MAC is the PBOC-padded SM4 CBC-MAC under the terminal's working MAC
key (TAK), first 8 bytes, upper-case hex. The sign-on exchange is MAC'd under
the terminal master key (TMK), since no TAK exists yet.

Response codes follow ISO 8583 as bank staff know them (``RC``).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from keys.mac import cbc_mac, pad80
from keys.suite import SM4, Suite
from protocol.money import MAX_AMOUNT_FEN  # one limit for messages, journal and bank file

MAX_MESSAGE_BYTES = 256 * 1024
MESSAGE_MAC_BYTES = 8
MAX_BATCH_UPLOAD_ITEMS = 2_000

TOPIC_PREFIX = "carepay/v1/term"
SHARED_UP_TOPIC = "$share/clearing/carepay/v1/term/+/up"


def up_topic(terminal_id: str) -> str:
    return f"{TOPIC_PREFIX}/{terminal_id}/up"


def down_topic(terminal_id: str) -> str:
    return f"{TOPIC_PREFIX}/{terminal_id}/down"


class RC:
    """ISO 8583-style response codes (应答码)."""

    APPROVED = "00"
    INVALID_TXN = "12"
    INVALID_AMOUNT = "13"
    INVALID_CARD = "14"
    ORIGINAL_NOT_FOUND = "25"
    INSUFFICIENT_BALANCE = "51"
    EXPIRED_ELIGIBILITY = "54"
    NOT_PERMITTED_CARD = "57"
    NOT_PERMITTED_PROVIDER = "58"
    SUSPECTED_FRAUD = "59"
    OVER_LIMIT = "61"
    CARD_BLOCKED = "62"
    DUPLICATE = "94"
    SYSTEM_ERROR = "96"
    MAC_ERROR = "A0"

    MEANINGS = {
        "00": "approved",
        "12": "invalid transaction",
        "13": "invalid amount",
        "14": "invalid card",
        "25": "original not found",
        "51": "insufficient balance",
        "54": "expired eligibility",
        "57": "not permitted for this card/program",
        "58": "not permitted for this provider",
        "59": "suspected fraud (cryptogram)",
        "61": "over limit",
        "62": "card blocked (lost)",
        "94": "duplicate",
        "96": "system error",
        "A0": "MAC error",
    }

    @classmethod
    def describe(cls, code: str) -> str:
        return cls.MEANINGS.get(code, f"unknown response code {code!r}")


class MessageError(ValueError):
    """A message that cannot be accepted: malformed, oversized, unknown type or bad field."""


def _not_json(o: object) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _sorted_encoder(ensure_ascii: bool) -> Any:
    """``json.dumps(…, sort_keys=True, separators=(",", ":"))`` built once: ``json.dumps`` with arguments
    constructs a ``JSONEncoder`` and its C encoder on every call (a third of the cost for a message).

    The C encoder is the one ``json.dumps`` itself uses, with the same arguments (minus the circular-reference
    check: a JSON body from a model dump is a tree), so the bytes are identical; without the C accelerator
    (another Python implementation) it falls back to ``json.dumps``.
    """
    try:
        from json.encoder import c_make_encoder
    except ImportError:
        c_make_encoder = None
    if c_make_encoder is None:
        return lambda body: [json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii)]
    return c_make_encoder(None, _not_json, encode_basestring_ascii if ensure_ascii else encode_basestring, None,
                          ":", ",", True, False, True)


_CANONICAL_ENCODER = _sorted_encoder(ensure_ascii=False)
_CANONICAL_ASCII_ENCODER = _sorted_encoder(ensure_ascii=True)


def canonical_json(body: dict[str, Any], ensure_ascii: bool = False) -> bytes:
    """Sorted, compact JSON as UTF-8: the bytes a MAC covers (``ensure_ascii=False``) — equal to
    ``json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=…).encode()``.

    >>> canonical_json({"b": 1, "a": {"d": "é", "c": None}})
    b'{"a":{"c":null,"d":"\\xc3\\xa9"},"b":1}'
    """
    encoder = _CANONICAL_ASCII_ENCODER if ensure_ascii else _CANONICAL_ENCODER
    return "".join(encoder(body, 0)).encode("utf-8")


def mac_hex(key: bytes, canonical: bytes, suite: Suite = SM4) -> str:
    """The message MAC over ``canonical`` bytes: PBOC padding, SM4 CBC-MAC, first 8 bytes, upper-case hex."""
    return cbc_mac(key, pad80(canonical, suite.block_bytes), None, suite)[:MESSAGE_MAC_BYTES].hex().upper()


def with_mac(canonical: bytes, mac: str) -> bytes:
    """The wire form of a signed message from its canonical bytes: the same JSON object with ``mac`` added
    as its last member (a JSON object's member order carries no meaning; the receiver re-sorts to check)."""
    if canonical == b"{}":
        return b'{"mac":"' + mac.encode("ascii") + b'"}'
    return canonical[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}'


_AWARE_JSON: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)
_MAC_MEMBER = b',"mac":"'


def without_mac(payload: bytes, mac: str) -> bytes | None:
    """The bytes a :func:`with_mac` payload was MAC'd over — its ``mac`` member cut off the end — or None
    when ``payload`` does not end with that member. The inverse of :func:`with_mac`.

    A receiver checks the MAC over these exact bytes first: no re-serialisation, and what it verified is
    what it parsed. A sender that laid its object out otherwise is checked over the canonical form instead.

    >>> without_mac(b'{"a":1,"mac":"00FF"}', "00FF")
    b'{"a":1}'
    >>> without_mac(b'{"mac":"00FF","a":1}', "00FF") is None
    True
    """
    tail = mac.encode("ascii") + b'"}'
    if not payload.endswith(tail):
        return None
    head = payload[:len(payload) - len(tail)]
    if head.endswith(_MAC_MEMBER) and len(head) > len(_MAC_MEMBER):
        return head[:-len(_MAC_MEMBER)] + b"}"
    if head == b'{"mac":"':
        return b"{}"
    return None


@dataclass(frozen=True, slots=True)
class Answered:
    """An answer as a host sends and remembers it: its canonical bytes (every field but ``mac``, as
    :meth:`Message.canonical_bytes` makes them), MAC'd when sent. ``parse_message(answered.signed_json(key))``
    is the message itself. Cheaper to keep than a model (plain str/bytes, not tracked by the garbage
    collector) and, for a transaction's answer, to make (:func:`txn_result_canonical`)."""

    terminal_id: str
    type: str
    response_code: str
    canonical: bytes

    def canonical_bytes(self) -> bytes:
        return self.canonical

    def signed_json(self, key: bytes, suite: Suite = SM4) -> bytes:
        return with_mac(self.canonical, mac_hex(key, self.canonical, suite))


TerminalId = Annotated[str, Field(pattern=r"^[0-9A-Z]{8}$")]
ProviderId = Annotated[str, Field(pattern=r"^[0-9A-Z]{15}$")]
BatchNo = Annotated[str, Field(pattern=r"^\d{6}$")]
TraceNo = Annotated[str, Field(pattern=r"^\d{6}$")]
Rrn = Annotated[str, Field(pattern=r"^[0-9A-Z]{12}$")]
AuthCode = Annotated[str, Field(pattern=r"^[0-9A-Z]{6}$")]
CardNo = Annotated[str, Field(pattern=r"^\d{19}$")]
Hex = Annotated[str, Field(pattern=r"^[0-9A-F]*$", max_length=1024)]
AmountFen = Annotated[int, Field(gt=0, le=MAX_AMOUNT_FEN)]
Program = Literal["voucher", "nursing", "restricted"]
DateYmd = Annotated[str, Field(pattern=r"^\d{8}$")]
TimeHms = Annotated[str, Field(pattern=r"^\d{6}$")]
ResponseCode = Annotated[str, Field(pattern=r"^[0-9A-Z]{2}$")]
BusinessDate = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]


class Message(BaseModel):
    """Fields every host message carries, and its MAC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    terminal_id: TerminalId
    msg_id: Annotated[str, Field(min_length=8, max_length=40, pattern=r"^[0-9A-Za-z-]+$")]
    sent_at: AwareDatetime
    mac: Hex = ""

    def canonical_bytes(self) -> bytes:
        """The bytes the MAC covers: every field but ``mac`` as sorted, compact JSON."""
        return canonical_json(self.model_dump(mode="json", exclude={"mac"}))

    def compute_mac(self, key: bytes, suite: Suite = SM4) -> str:
        return mac_hex(key, self.canonical_bytes(), suite)

    def signed(self, key: bytes, suite: Suite = SM4) -> Self:
        """A copy with ``mac`` set under ``key`` (TAK; TMK for sign-on)."""
        return self.model_copy(update={"mac": self.compute_mac(key, suite)})

    def signed_json(self, key: bytes, suite: Suite = SM4) -> bytes:
        """The wire bytes of ``self.signed(key)`` from one model dump: the canonical JSON with its ``mac``
        (parses to the same message as ``self.signed(key).to_json()``; only the member order differs)."""
        body = self.model_dump(mode="json")
        body.pop("mac", None)
        canonical = canonical_json(body)
        return with_mac(canonical, mac_hex(key, canonical, suite))

    def mac_ok(self, key: bytes, suite: Suite = SM4) -> bool:
        return len(self.mac) == 2 * MESSAGE_MAC_BYTES and hmac.compare_digest(self.compute_mac(key, suite), self.mac)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    def wire_json(self) -> bytes:
        """The bytes a sender publishes: the canonical JSON with ``mac`` as its last member (:func:`with_mac`),
        which a receiver checks as they are (:func:`without_mac`) instead of re-serialising the parsed message.
        Parses to the same message as :meth:`to_json`. Unsigned (no ``mac``): :meth:`to_json`."""
        if not self.mac:
            return self.to_json()
        return with_mac(self.canonical_bytes(), self.mac)


# --- sign-on (签到): terminal proves itself with SM2 over a host nonce, receives working keys under its TMK


class SignOn(Message):
    """``host_nonce`` empty on the first call (the host answers with a challenge); then signed by the terminal's SM2 key."""

    type: Literal["sign_on"] = "sign_on"
    host_nonce: Hex = ""
    signature: Hex = ""  # raw r‖s over sign_on_signed_bytes()
    software_version: str = Field(default="", max_length=40)

    def signed_bytes(self) -> bytes:
        return f"carepay-sign-on|{self.terminal_id}|{self.host_nonce}".encode()


class SignOnChallenge(Message):
    type: Literal["sign_on_challenge"] = "sign_on_challenge"
    orig_msg_id: str
    host_nonce: Hex


class SignOnOk(Message):
    type: Literal["sign_on_ok"] = "sign_on_ok"
    orig_msg_id: str
    response_code: ResponseCode
    tak_under_tmk: Hex = ""
    tek_under_tmk: Hex = ""
    tak_kcv: Hex = ""
    tek_kcv: Hex = ""
    key_version: int = 0
    business_date: BusinessDate | None = None
    message: str = Field(default="", max_length=200)
    provider_id: str = Field(default="", max_length=15)  # who the registry binds the terminal to (receipts)
    provider_name: str = Field(default="", max_length=128)


# --- purchase (消费) and its answer


class CardProof(BaseModel):
    """What the card proved for a charge: the TAC and everything it covers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    card_no: CardNo
    app_serial: Annotated[str, Field(pattern=r"^[0-9A-F]{16}$")]
    key_version: Annotated[int, Field(ge=0, le=255)]
    suite: Literal["sm4", "3des"] = "sm4"
    atc: Annotated[int, Field(ge=0, le=0xFFFF)]
    ttn: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
    txn_date: DateYmd
    txn_time: TimeHms
    tac: Annotated[str, Field(pattern=r"^[0-9A-F]{8}$")]


class Purchase(Message):
    type: Literal["purchase"] = "purchase"
    provider_id: ProviderId
    batch_no: BatchNo
    trace_no: TraceNo
    program: Program
    service_category: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")]
    amount_fen: AmountFen
    card: CardProof


class OfflineAdvice(Message):
    """离线通知: a purchase approved offline under the floor limit, uploaded later."""

    type: Literal["offline_advice"] = "offline_advice"
    provider_id: ProviderId
    batch_no: BatchNo
    trace_no: TraceNo
    program: Program
    service_category: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")]
    amount_fen: AmountFen
    card: CardProof
    offline_auth_code: AuthCode
    approved_at: AwareDatetime


class Reversal(Message):
    """冲正: undo a purchase whose answer was lost or whose card step failed after approval."""

    type: Literal["reversal"] = "reversal"
    provider_id: ProviderId
    batch_no: BatchNo
    trace_no: TraceNo
    orig_trace_no: TraceNo
    orig_msg_id: str
    card_no: CardNo
    amount_fen: AmountFen
    reason: Literal["timeout", "card_failed", "operator"] = "timeout"


class Void(Message):
    """撤销: cancel a purchase of the same batch, full amount."""

    type: Literal["void"] = "void"
    provider_id: ProviderId
    batch_no: BatchNo
    trace_no: TraceNo
    orig_rrn: Rrn
    orig_trace_no: TraceNo
    card_no: CardNo
    amount_fen: AmountFen


class Refund(Message):
    """退货: return all or part of an earlier purchase; later days allowed, never above what is left."""

    type: Literal["refund"] = "refund"
    provider_id: ProviderId
    batch_no: BatchNo
    trace_no: TraceNo
    orig_rrn: Rrn
    card_no: CardNo
    amount_fen: AmountFen


def txn_result_canonical(*, type: str, terminal_id: str, msg_id: str, sent_at: datetime, orig_msg_id: str,
                         batch_no: str, trace_no: str, response_code: str, rrn: str | None = None,
                         auth_code: str | None = None, balance_after_fen: int | None = None,
                         business_date: str | None = None, message: str = "") -> bytes:
    """``TxnResult(**fields).canonical_bytes()`` without building the model: for a host that makes the answer
    from its own journal row (values already in the model's forms; ``message`` at most 200 characters).
    The equality is property-tested; the datetime goes through pydantic's own JSON serialiser."""
    return canonical_json({
        "type": type, "terminal_id": terminal_id, "msg_id": msg_id, "sent_at": _AWARE_JSON.dump_python(sent_at, mode="json"),
        "orig_msg_id": orig_msg_id, "batch_no": batch_no, "trace_no": trace_no, "response_code": response_code,
        "rrn": rrn, "auth_code": auth_code, "balance_after_fen": balance_after_fen, "business_date": business_date,
        "message": message})


class TxnResult(Message):
    """The host's answer to purchase / void / refund / reversal / offline advice."""

    type: Literal["purchase_result", "void_result", "refund_result", "reversal_result", "advice_result"]
    orig_msg_id: str
    batch_no: BatchNo
    trace_no: TraceNo
    response_code: ResponseCode
    rrn: Rrn | None = None
    auth_code: AuthCode | None = None
    balance_after_fen: int | None = None
    business_date: BusinessDate | None = None
    message: str = Field(default="", max_length=200)

    @property
    def approved(self) -> bool:
        return self.response_code == RC.APPROVED


# --- batch settlement (批结算)


class BatchTotals(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    purchase_count: int = Field(default=0, ge=0)
    purchase_fen: int = Field(default=0, ge=0)
    void_count: int = Field(default=0, ge=0)
    void_fen: int = Field(default=0, ge=0)
    refund_count: int = Field(default=0, ge=0)
    refund_fen: int = Field(default=0, ge=0)
    advice_count: int = Field(default=0, ge=0)
    advice_fen: int = Field(default=0, ge=0)


class BatchSettle(Message):
    type: Literal["batch_settle"] = "batch_settle"
    provider_id: ProviderId
    batch_no: BatchNo
    totals: BatchTotals


class BatchSettleResult(Message):
    type: Literal["batch_settle_result"] = "batch_settle_result"
    orig_msg_id: str
    batch_no: BatchNo
    response_code: ResponseCode
    balanced: bool
    host_totals: BatchTotals


class BatchItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trace_no: TraceNo
    txn_type: Literal["PURCHASE", "VOID", "REFUND", "ADVICE"]
    amount_fen: AmountFen
    card_no: CardNo
    program: Program
    rrn: Rrn | None = None


class BatchUpload(Message):
    """The details of a batch that did not balance (批上送)."""

    type: Literal["batch_upload"] = "batch_upload"
    provider_id: ProviderId
    batch_no: BatchNo
    items: Annotated[list[BatchItem], Field(max_length=MAX_BATCH_UPLOAD_ITEMS)]


class BatchUploadResult(Message):
    type: Literal["batch_upload_result"] = "batch_upload_result"
    orig_msg_id: str
    batch_no: BatchNo
    response_code: ResponseCode
    missing_on_host: list[TraceNo] = Field(default_factory=list)
    missing_on_terminal: list[TraceNo] = Field(default_factory=list)
    amount_differs: list[TraceNo] = Field(default_factory=list)


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"
    software_version: str = Field(default="", max_length=40)
    journal_backlog: int = Field(default=0, ge=0)
    offline_pending: int = Field(default=0, ge=0)


AnyMessage = Annotated[
    SignOn | SignOnChallenge | SignOnOk | Purchase | OfflineAdvice | Reversal | Void | Refund | TxnResult
    | BatchSettle | BatchSettleResult | BatchUpload | BatchUploadResult | Heartbeat,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyMessage)

UP_TYPES = frozenset({"sign_on", "purchase", "offline_advice", "reversal", "void", "refund", "batch_settle",
                      "batch_upload", "heartbeat"})
RESULT_TYPE = {"purchase": "purchase_result", "void": "void_result", "refund": "refund_result",
               "reversal": "reversal_result", "offline_advice": "advice_result"}


def parse_message(raw: bytes | str) -> Message:
    """Parse one JSON payload into its message model; :class:`MessageError` on anything unacceptable."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise MessageError(f"invalid message: {where}: {first.get('msg', 'invalid')}") from None


def now_utc() -> datetime:
    return datetime.now(UTC)
