"""Training. ``loop`` is the IP-Adapter trainer (``train``, ``export_checkpoint``)
on the shared ``runner`` (step, log, checkpoint, resume; also runs the demo's
base-model stages); ``step`` the step as pure functions; ``optim`` the
optimizer (AdamW, schedule, clipping, accumulation, EMA); ``data`` the data
sources and loader, ``shards`` / ``webdataset`` img2dataset tar shards (index, source); ``sharding`` the mesh and shardings; ``objectives`` the
losses of the demo's CLIP and VAE stages."""
