"""The parts of feature extraction (`hnm_ray/extract.py` composes them): the stored tile index and the stream read
from it, tile decoding (cuCIM, checked tiles), and the encoder pool's size from the live nodes."""
