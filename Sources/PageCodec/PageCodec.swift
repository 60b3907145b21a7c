// PageCodec: sources follow.
