"""ssmify: turn a pretrained transformer into a distilled Mamba-2 state-space model or hybrid."""
