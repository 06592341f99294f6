"""Runnable examples of crux_workers flows (the seed's writer and onboarding flows)."""
