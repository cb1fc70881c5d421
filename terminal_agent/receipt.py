"""The printed receipt (签购单): plain text, one per transaction, as a thermal POS printer would print it.

Shows provider, terminal, masked card number (first 6, last 4), program, type, amount,
balance after, RRN, auth code, batch/trace and time — never the full card number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from protocol.ids import mask_card_no
from protocol.money import format_fen

RECEIPT_WIDTH_CHARS = 40
LOCAL_TZ = ZoneInfo("Asia/Shanghai")

PROGRAM_NAMES = {"voucher": "养老服务券 voucher", "nursing": "护理补贴 nursing", "restricted": "专用账户 restricted"}
TXN_NAMES = {"purchase": "消费 PURCHASE", "void": "撤销 VOID", "refund": "退货 REFUND",
             "offline_purchase": "离线消费 OFFLINE PURCHASE", "reversal": "冲正 REVERSAL"}


@dataclass(frozen=True)
class ReceiptData:
    """What a receipt shows; ``card_no`` is masked when printed."""

    provider_id: str
    provider_name: str
    terminal_id: str
    card_no: str
    program: str
    txn_type: str
    amount_fen: int
    batch_no: str
    trace_no: str
    when: datetime
    approved: bool
    response_code: str | None = None
    message: str = ""
    balance_after_fen: int | None = None
    rrn: str | None = None
    auth_code: str | None = None
    copy: str = "商户存根 PROVIDER COPY"


def _line(left: str, right: str, width: int = RECEIPT_WIDTH_CHARS) -> str:
    gap = max(1, width - len(left) - len(right))
    return f"{left}{' ' * gap}{right}"


def render_receipt(r: ReceiptData) -> str:
    """The receipt as text lines of at most ``RECEIPT_WIDTH_CHARS`` (CJK counted as one)."""
    rule = "-" * RECEIPT_WIDTH_CHARS
    when = r.when.astimezone(LOCAL_TZ)
    lines = [
        "养老助残卡 签购单".center(RECEIPT_WIDTH_CHARS - 5),
        "CAREPAY CARD RECEIPT".center(RECEIPT_WIDTH_CHARS),
        r.copy,
        rule,
        f"商户 PROVIDER: {r.provider_name}" if r.provider_name else "商户 PROVIDER:",
        _line("商户号 PROVIDER ID", r.provider_id),
        _line("终端号 TERMINAL", r.terminal_id),
        _line("卡号 CARD", mask_card_no(r.card_no) if r.card_no else "-"),
        _line("项目 PROGRAM", PROGRAM_NAMES.get(r.program, r.program)),
        _line("类型 TYPE", TXN_NAMES.get(r.txn_type, r.txn_type.upper())),
        _line("批次号 BATCH", r.batch_no),
        _line("流水号 TRACE", r.trace_no),
        _line("日期时间 TIME", f"{when:%Y-%m-%d %H:%M:%S}"),
        _line("参考号 RRN", r.rrn or "-"),
        _line("授权码 AUTH CODE", r.auth_code or "-"),
        rule,
        _line("金额 AMOUNT", f"RMB {format_fen(r.amount_fen)}"),
    ]
    if r.balance_after_fen is not None:
        lines.append(_line("余额 BALANCE", f"RMB {format_fen(r.balance_after_fen)}"))
    lines.append(rule)
    if r.approved:
        lines.append("交易成功 APPROVED")
    else:
        code = f" ({r.response_code})" if r.response_code else ""
        lines.append(f"交易失败 DECLINED{code}")
        if r.message:
            lines.append(r.message[:RECEIPT_WIDTH_CHARS * 2])
    if r.txn_type == "offline_purchase":
        lines.append("离线批准 approved offline; uploaded later")
    lines.append("持卡人签名 CARDHOLDER SIGNATURE:")
    lines.append("")
    return "\n".join(lines)
