"""Personalisation (个人化) of simulated cards: keys diversified and loaded, the partition's files written.

``issue_cards`` builds a seeded, reproducible set of cardholders the way a civil-affairs bureau
would: valid 19-digit Luhn card numbers, valid resident ID numbers whose birth date matches the
eligibility category (60+, 80+, disability, 失能), Beijing district codes (110101…110119) and
9-digit street codes, an eligibility valid-until date (优待有效期), and the programs the card may
spend (every card ``voucher``; 失能 and grade-1/2 disability cards also ``nursing``).

Keys: each card gets ``key_set.card_key(purpose, version, app_serial)`` for every purpose. The key
set defaults to ``IssuerKeySet.demo(seed=issuer_seed, suite)``; a key store can hand in its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

from keys.issuer import PURPOSES, IssuerKeySet
from keys.suite import Suite
from protocol import card_files as cf
from protocol.ids import make_card_no, make_id_no
from simulator.card import VirtualCard

BEIJING_DISTRICTS = ("110101", "110102", "110105", "110106", "110107", "110108", "110109", "110111", "110112",
                     "110113", "110114", "110115", "110116", "110117", "110118", "110119")
"""Beijing district codes (区划代码): 东城 西城 朝阳 丰台 石景山 海淀 门头沟 房山 通州 顺义 昌平 大兴 怀柔 平谷 密云 延庆."""
CARD_BIN = "621888"  # house issuer prefix of the card number
SURNAMES = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗"
GIVEN = "秀英桂兰玉珍凤华淑芳建国志强明德文静春梅永福宝山金海德胜"
DEFAULT_PIN = "123456"
DEFAULT_ISSUER_SEED = "carepay-demo"
MAX_ISSUE_COUNT = 100_000


@dataclass(frozen=True)
class Cardholder:
    """Cardholder data as written to the cardholder EF."""

    card_no: str
    name: str
    id_no: str
    birth_date: date
    district_code: str
    street_code: str
    category: cf.Category
    category_grade: int
    valid_until: date

    def ef_bytes(self) -> bytes:
        return cf.CARDHOLDER.build({
            "card_no": self.card_no, "name": self.name, "id_no": self.id_no,
            "birth_date": f"{self.birth_date:%Y%m%d}", "district_code": self.district_code,
            "street_code": self.street_code, "category": int(self.category), "category_grade": self.category_grade,
            "valid_until": f"{self.valid_until:%Y%m%d}"})


def entitlement_ef(programs: tuple[str, ...], grade: int) -> bytes:
    return cf.ENTITLEMENT.build({"programs": cf.programs_to_bits(programs), "grade": grade, "reserved": bytes(5)})


def personalise(cardholder: Cardholder, programs: tuple[str, ...], *, app_serial: bytes, aid: bytes,
                key_set: IssuerKeySet, key_version: int | None = None, pin: str = DEFAULT_PIN,
                label: str = "") -> VirtualCard:
    """One card: the key set's card keys for ``app_serial`` loaded, the files written."""
    version = key_set.current_version if key_version is None else key_version
    keys = {p: key_set.card_key(p, version, app_serial) for p in PURPOSES}
    cf.pin_block(pin)  # validates
    return VirtualCard(aid=aid, suite=key_set.suite, app_serial=app_serial, key_version=version, keys=keys,
                       cardholder_ef=cardholder.ef_bytes(), entitlement_ef=entitlement_ef(programs,
                                                                                          cardholder.category_grade),
                       pin=pin, label=label or cardholder.card_no)


def _age_range(category: cf.Category) -> tuple[int, int]:
    return {cf.Category.AGE60: (60, 79), cf.Category.AGE80: (80, 99), cf.Category.DISABILITY: (18, 90),
            cf.Category.DISABLED_ELDERLY: (60, 98)}[category]


def random_cardholder(rng: random.Random, index: int, today: date) -> tuple[Cardholder, tuple[str, ...]]:
    category = rng.choices(list(cf.Category), weights=(50, 25, 15, 10))[0]
    lo, hi = _age_range(category)
    age_days = rng.randint(lo * 366, hi * 365)
    birth = today - timedelta(days=age_days)
    district = rng.choice(BEIJING_DISTRICTS)
    street = f"{district}{rng.randint(1, 30):03d}"
    grade = rng.randint(1, 4) if category in (cf.Category.DISABILITY, cf.Category.DISABLED_ELDERLY) else 0
    name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.randint(1, 2)))
    holder = Cardholder(
        card_no=make_card_no(CARD_BIN, index), name=name, id_no=make_id_no(district, birth, rng.randint(1, 999)),
        birth_date=birth, district_code=district, street_code=street, category=category, category_grade=grade,
        valid_until=today + timedelta(days=rng.randint(365, 5 * 365)))
    nursing = category == cf.Category.DISABLED_ELDERLY or (category == cf.Category.DISABILITY and grade <= 2)
    return holder, ("voucher", "nursing") if nursing else ("voucher",)


def issue_cards(count: int, *, aid: bytes, suite: Suite | str = Suite.SM4, seed: int = 1,
                key_set: IssuerKeySet | None = None, issuer_seed: str = DEFAULT_ISSUER_SEED,
                first_index: int = 1, pin: str = DEFAULT_PIN, today: date | None = None) -> list[VirtualCard]:
    """``count`` personalised cards, reproducible for a given ``seed``."""
    if not 0 < count <= MAX_ISSUE_COUNT:
        raise ValueError(f"count must be 1..{MAX_ISSUE_COUNT}")
    s = Suite.parse(suite)
    ks = key_set or IssuerKeySet.demo(issuer_seed, s)
    if ks.suite is not s:
        raise ValueError("key set suite differs from the requested suite")
    rng = random.Random(f"{seed}|{s.value}")
    day = today or date.today()
    cards = []
    for i in range(first_index, first_index + count):
        holder, programs = random_cardholder(rng, i, day)
        serial = bytes.fromhex(f"{(seed % 10_000):04d}{0 if s is Suite.SM4 else 1:01d}{i:011d}")
        cards.append(personalise(holder, programs, app_serial=serial, aid=aid, key_set=ks, pin=pin))
    return cards
