"""Money arithmetic: Decimal only, two decimals, never a float.

Amounts travel as decimal strings ("12.50"), are computed as :class:`~decimal.Decimal`
quantized to the cent with banker's rounding, and are formatted with exactly two
decimals, the contract's ``money`` pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal

CENT = Decimal("0.01")
MAX_UNIT_PRICE = Decimal("1000000.00")
"""The largest unit price accepted (a sanity cap, not a business rule)."""


def quantize(amount: Decimal) -> Decimal:
    """Round to the cent (half to even)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)


def line_total(unit_price: Decimal, quantity: int) -> Decimal:
    """The total of one line: unit price times quantity, to the cent."""
    return quantize(unit_price * quantity)


def order_total(line_totals: Iterable[Decimal]) -> Decimal:
    """The sum of line totals, to the cent."""
    return quantize(sum(line_totals, Decimal("0")))


def format_money(amount: Decimal) -> str:
    """The wire form: a plain decimal string with two decimals ("25.00")."""
    return f"{quantize(amount):f}"
