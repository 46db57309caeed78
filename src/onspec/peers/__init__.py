"""Other systems' proposers, built from their published sources and run beside onspec's own."""
