"""Running over many inputs: resumable state on disk, shards, many processes under torchrun,
and merging the folders that shards wrote."""
