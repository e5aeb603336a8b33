"""Alignment on TRL: constitution-guided SFT and curiosity-over-hedging DPO."""
