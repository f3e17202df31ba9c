"""Ops: one file per op (plain-torch reference, Triton kernel, launcher, custom op, public function)."""

__all__: list[str] = []
