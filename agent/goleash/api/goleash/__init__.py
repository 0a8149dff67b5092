"""Generated from proto/goleash/v1 by scripts/genproto.py (`make proto`)."""
