"""Shared base config: SD v1.4 + converted BEATs iter3+ AS2M fine-tuned (cpt2), the thesis's losses and data settings.

Every experiment config starts from this one and changes only what differs. On its own it trains the
embedder like exp1 (docs/design.md §2.6):

  python train.py --config configs/default.py --workdir runs/default \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

Expected runtime: as configs/exp1.py. The config is locked: an unknown key (here or on the command
line) is an error, and `mtok_jax.config_utils.validate` checks the values before training starts.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir_name = "default"  # train.py's default workdir is runs/<workdir_name>
    c.seed = 0
    c.multihost = False  # jax.distributed.initialize() auto-detected (also MTOK_MULTIHOST=1; explicit: train.py flags)

    # Models. sd_path: a local HF folder (Flax msgpack or PyTorch-layout safetensors) or a hub id.
    c.model = ml_collections.ConfigDict(dict(
        sd_path="CompVis/stable-diffusion-v1-4",
        # a hub id sd_path is read from the local HF cache only; True: fetch what is missing from the Hub
        allow_download=False,
        # params_io folder converted from BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (what AudioToken and
        # the thesis load; not the self-supervised BEATs_iter3_plus_AS2M.pt)
        beats_path="checkpoints/beats_iter3_plus_as2m_cpt2",
        embedder_path="",  # optional initial embedder (params_io folder); "" = PyTorch-style random init
        beats_layers=(3, 7, 11),  # 0-based BEATs blocks whose outputs are concatenated
        dtype="float32",  # compute dtype: float32 | bfloat16 (master params stay float32)
        beats_train_mode=False,  # thesis: BEATs dropout/layer-drop on while training; AudioToken: eval
        unary_dropout_at_inference=True,  # reference quirk: embedder p=0.5 dropout also at inference
        split_conv_pos=True,  # BEATs positional conv as 16 ungrouped convs (fast backward on XLA:CPU)
        # BEATs attention: auto (blocked on a CPU, else batched) | batched (all heads in one product) |
        # blocked (by heads and blocks of queries, whose scores stay in cache: mtok_jax/models/attention.py)
        beats_attention="auto",
        # UNet attention: auto (cuDNN flash attention at the large levels on a GPU in bfloat16, else einsum) |
        # einsum (diffusers' own) | xla (jax.nn.dot_product_attention) | cudnn (mtok_jax/models/attention.py)
        attention="auto",
        # UNet stride-1 convolutions: auto (matmul on a CPU, else xla) | xla | matmul (im2col products where
        # XLA:CPU's convolution is slow: mtok_jax/models/conv.py)
        conv="auto",
    ))

    c.prompt = ml_collections.ConfigDict(dict(
        train="an art image of <*>",
        inference="an art image of <*>, 4k, high resolution",
        placeholder="<*>",
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="music_image",  # TFDS builder
        data_dir="data/tfds",  # TFDS data_dir holding the built dataset
        builder_config="",  # built config name ("" = the one built under data_dir whose clip length and image size match)
        clip_seconds=30.0,  # first 30 s of each clip (repeat-padded); must match the built dataset
        image_size=512,  # square side in pixels (bicubic resize); must match the built dataset
        reference_512x320=False,  # dataset built with the reference's 512×320 (W×H) stretched images; samples 512²
        audio_44k_as_16k=False,  # thesis quirk: 44.1 kHz samples fed to the 16 kHz front-end
        stereo="first",  # multi-channel audio → mono: first | mean; must match the built dataset (reference: first)
        bgr=False,  # thesis quirk: images fed in BGR channel order
        seed=0,  # pairing / shuffling seed (an epoch's order is a function of (seed, epoch))
        prefetch=2,  # host batches prepared ahead
        # exp1 feature cache (python -m mtok_jax.data.cache): frozen BEATs features + VAE posterior moments computed
        # once; used (built when missing) whenever neither BEATs nor the VAE trains and BEATs runs in eval mode
        feature_cache=True,
        feature_cache_dtype="bfloat16",  # storage of the BEATs features: bfloat16 (6.9 MB per 30 s clip) | float32
        feature_cache_dir="",  # "" = DATA_DIR/feature_cache/BUILDER_CONFIG
    ))

    c.train = ml_collections.ConfigDict(dict(
        trainable="embedder",  # regex on parameter paths 'part/...' (parts: beats embedder text unet vae)
        epochs=25,
        batch_size=8,  # examples per micro-batch (global, over all devices)
        grad_accum=1,  # micro-batches per optimizer step (update == the big batch's update)
        faithful_accumulation=False,  # reference: Σ of per-micro-batch gradients (own cosine term each, no ÷ accum)
        val_batch_size=1,
        lr=8e-5,
        schedule="cosine",  # cosine | constant
        warmup_steps=500,  # linear warm-up updates: the script's lr_warmup_steps=500 (its cosine uses it)
        schedule_sized_in_micro_batches=False,  # prelim2 script: warm-up/length × grad_accum, stepped per update
        # The lr here is the effective one (no scaling). The script's scale_lr=True multiplied its base lr
        # by batch × accum × devices: exp1's 8e-5 = its default base 1e-5 × batch 8.
        scale_lr=False,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-2,  # decoupled (AdamW), on every trainable leaf
        lambda_l1=0.01,  # × mean|e| (the code's L1; the thesis writes ||e||_1)
        lambda_l2=0.0,  # × mean_b ||e||^2
        lambda_cl=0.01,  # × (1 − mean_b cos(e, τ_label))^2
        uncond_prob=0.0,  # share of training examples whose text states are the empty prompt's (CFG dropout)
        log_every=10,  # steps between metrics.jsonl train lines
        checkpoint_every=500,  # steps between `latest` checkpoints (also at every epoch end)
        max_steps=-1,  # stop after this many optimizer steps (-1: run all epochs; 0: load, compile, train nothing)
        remat=False,  # recompute UNet blocks and BEATs layers in the backward pass (less memory, ≈ +1 forward)
        update_unet_first=False,  # apply the UNet's update before the audio branch's backward pass (README)
        fsdp_min_size=2**22,  # leaves with more elements than this are sharded over `fsdp`
        report_to=("jsonl", "tensorboard"),  # metrics.jsonl (+ loss.png) and/or WORKDIR/tensorboard/ event files
        sample_every_epochs=5,  # validation images (one held-out clip per label) every N epochs; 0 = off
        sample_steps=20,  # denoising steps of the validation images
        profile_steps=(0, 0),  # jax.profiler trace of steps [start, stop) into WORKDIR/profile/; (0, 0) = off
    ))

    # Mesh axis sizes; one may be -1 (all remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

    c.sample = ml_collections.ConfigDict(dict(
        num_images=4,
        steps=50,
        guidance=7.5,
        scheduler="pndm",  # pndm | ddim | dpm | euler
        seed=0,
        images_per_device=1,  # compiled images per device and call: 1 = images independent of batch/devices
    ))

    c.metrics = ml_collections.ConfigDict(dict(
        clip_path="checkpoints/clip-vit-base-patch32",
        inception_path="checkpoints/pt_inception",
        wav2clip_path="checkpoints/wav2clip",
        num_images=335,
        per_label=10,
        seed=0,  # random draw of the evaluated test clips within each label (ids recorded in the manifest)
        generated_format="jpeg75",  # generated images scored from: png | jpeg75 (the thesis: PIL's JPEG quality 75)
    ))

    c.lock()
    return c
