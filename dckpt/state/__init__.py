"""Training state <-> (safe tree, tensor list): flatten, restore, tensor reads into live
memory (reading), async staging buffers (staging), RNG streams (rng) and data position
(data). May import storage, format and errors; never distributed, engine or anything above."""
