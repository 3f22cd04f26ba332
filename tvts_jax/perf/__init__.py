"""Performance of the training step: speed, FLOPs, MFU, memory, input throughput.

    python -m tvts_jax.perf --config=configs/small.py --steps=20
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=24 \
        --config.compute_dtype=bfloat16 --find_max_batch          # on a GPU / TPU
    python -m tvts_jax.perf --config=configs/paper.py --config.compute_dtype=bfloat16 \
        --aot_target=h100 --find_max_batch       # XLA:GPU's memory for an H100, without one
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=2 --text_len=32 \
        --compare_torch                          # side by side with the PyTorch reference
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=8 --input
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=32 --input_only \
        --input_variant=base --input_variant=jpeg_quality=75   # the pipeline alone, side by side
    python -m tvts_jax.perf.torch_ref --config=configs/paper.py --config.batch_size=2 \
        --text_len=32 --steps=8                  # the PyTorch reference alone

`python -m tvts_jax.benchmark` is the same command under its former name.

Modules:

    __main__.py   the command line: flags, the run, the AOT run, the printed summary
    flops.py      analytic FLOPs of the step, the devices' peak FLOP/s, MFU
    hlo.py        what the compiled step looks like: HLO / StableHLO statistics, XLA's memory
                  and cost analyses, the devices' memory limit and statistics
    step.py       synthetic batches, compiling the step, the largest batch that fits, timing
                  the step
    input.py      the input pipeline alone (variants side by side, cores per accelerator) and
                  feeding the step (imports TensorFlow when called)
    torch_ref.py  the reference architecture in PyTorch, in a subprocess, for side-by-side
                  timing (the only module that imports torch)
    aot.py        compiling the step for a GPU this machine lacks (deviceless XLA:GPU)

Importing the package imports nothing; the step timing needs JAX alone.
"""
