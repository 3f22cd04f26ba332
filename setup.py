"""tvts-jax: TVTS video pre-training from narrated video, in JAX."""
import setuptools

setuptools.setup(
    name="tvts-jax",
    version="0.1.0",
    description="Turning to Video for Transcript Sorting (CVPR 2023) in JAX/Flax",
    packages=setuptools.find_packages(include=["tvts_jax", "tvts_jax.*", "data_pipelines",
                                               "data_pipelines.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "clu>=0.0.12",
        "ml-collections>=1.0",
        # tf.data only; the CPU wheel avoids pulling CUDA into a JAX install.
        "tensorflow-cpu>=2.18",
        "tensorboard",  # clu.metric_writers imports it
        "sentencepiece>=0.2",
        "av>=12",  # PyAV, video decoding in data_pipelines
        "apache-beam>=2.60",
        "safetensors>=0.4",
        "pillow",  # JPEG writing in the data tools and tests
        "tqdm",
        "absl-py",
        "numpy",
        "matplotlib",  # the sort evaluator's figures and the ablation's chart (Agg backend)
    ],
    extras_require={
        # Only to import PyTorch checkpoints (MAE, reference TVTS) and for their parity tests.
        "torch": ["torch", "torchvision", "timm"],
        # Speech recognition for videos without captions (data_pipelines.asr); each backend is
        # imported only when used.
        "asr": ["faster-whisper>=1.1", "vosk>=0.3.45"],
        # transformers builds the tiny Whisper of the ASR tests; webvtt-py is the reference
        # the VTT parser is checked against. The tests' Vosk model comes from the videogrep
        # wheel, installed without its dependencies by .ci/run.
        "test": ["pytest", "pytest-xdist", "torch", "torchvision", "timm", "faster-whisper>=1.1",
                 "vosk>=0.3.45", "transformers>=4.40", "webvtt-py>=0.5"],
    },
)
