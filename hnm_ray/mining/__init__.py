"""Hard negative mining and pseudo labels (paper steps 5-6): the exact global top-k (`queue`), the named miner actor
(`miner`), the selection rules (`selection`)."""
