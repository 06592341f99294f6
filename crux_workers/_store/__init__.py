"""Durable record and step cache behind small protocols the engine talks to."""
