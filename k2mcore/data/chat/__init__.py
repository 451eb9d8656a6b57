"""Chat data: conversations rendered by the tokenizer's chat template (`template`, `encoding`)
with the loss on the assistant tokens, preprocessed into a token file and a loss-mask file
(`preprocess`), read as megatron-style datasets (`dataset`), and packed several to a row for
`data.packing` (`packing`). `k2mcore.data` exports the public names lazily."""
