"""Boards, RPC, tuning and bit-width search."""
