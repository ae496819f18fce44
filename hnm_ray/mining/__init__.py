"""Pseudo labels and hard negative mining (paper steps 5-6): tile scores of the round's aggregator (`scoring`), the
exact global top-k (`queue`) in the named miner actor (`miner`), the selection rules (`selection`), and one round's
selection put together (`pseudo_labels`)."""
