"""What kvtier ships for testing tiers of your own: the conformance suite (``TierConformance``) and
the helpers it uses (``small_layout``, ``make_keys``, ``make_payloads``).  Needs pytest."""

from kvtier.testing.conformance import TierConformance, make_keys, make_payloads, small_layout

__all__ = ["TierConformance", "make_keys", "make_payloads", "small_layout"]
