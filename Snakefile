"""ambient-med: from hospital MRI to an ambient diffusion model that never saw a full scan.

    snakemake --cores 8 train    # every configured cohort's model
    snakemake --cores 8 all      # models, samples and evaluation

Each rule is a thin call to the `ambient-med` CLI; the logic lives in the package.
"""

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from ambient_med import __version__
from ambient_med.config import cohort_settings, stage_json, validate_config
from ambient_med.errors import AmbientMedError

min_version("9.0")


report: "config/report/workflow.rst"


configfile: "config/config.yaml"


# One clear line for a bad config (naming the key) before Snakemake's own validation, which
# also fills in every default from the schema.
try:
    validate_config(config)
except AmbientMedError as exc:
    raise WorkflowError(str(exc))
validate(config, "config/schema.yaml", set_default=True)

COHORTS = sorted(config["cohorts"])
POOLS = sorted(config["pools"])
# (pool, member cohort) pairs: every pooled model is audited against each member's data.
POOL_AUDITS = [(pool, c) for pool in POOLS for c in config["pools"][pool]["cohorts"]]
ENV = "envs/ambient-med.yaml"


def corrupt_kinds(cohort):
    """Image cohorts get both retrospective corruptions; raw k-space is taken as acquired."""
    if config["cohorts"][cohort]["source"] == "kspace":
        return ["native"]
    return ["pixel", "kspace"]


CORRUPTED = [
    f"results/{cohort}/corrupt/{kind}.h5"
    for cohort in COHORTS
    for kind in corrupt_kinds(cohort)
]


wildcard_constraints:
    cohort="[A-Za-z0-9][A-Za-z0-9_-]*",
    pool="[A-Za-z0-9][A-Za-z0-9_-]*",
    kind="pixel|kspace|native",


def cohort_input(wildcards):
    """The demo cohort's generated folder, or the configured folder of a real cohort."""
    try:
        settings = cohort_settings(config, wildcards.cohort)
    except AmbientMedError as exc:
        raise WorkflowError(str(exc))
    if not settings["demo"] and not Path(settings["input"]).is_dir():
        raise WorkflowError(
            f"config key 'cohorts.{wildcards.cohort}.input': folder "
            f"'{settings['input']}' does not exist"
        )
    return settings["input"]


def members(name):
    """The cohorts behind a model: a pool's members, or the cohort itself."""
    return config["pools"][name]["cohorts"] if name in config["pools"] else [name]


def measurement_store(cohort):
    return f"results/{cohort}/corrupt/{config['cohorts'][cohort]['corruption']}.h5"


def measurements(wildcards):
    """The measurement store the cohort's model is trained on (a pool's first member's:
    sampling takes coil maps from it)."""
    return measurement_store(members(wildcards.cohort)[0])


def train_input(wildcards):
    """Corrupted measurements, one store per member for a pool; only train_mode 'clean'
    reads clean slice stores."""
    cohorts = members(wildcards.cohort)
    if config["cohorts"][cohorts[0]]["train_mode"] == "clean":
        return [f"results/{c}/ingest/slices.h5" for c in cohorts]
    return [measurement_store(c) for c in cohorts]


def corrupt_input(wildcards):
    store = "raw" if wildcards.kind == "native" else "slices"
    return f"results/{wildcards.cohort}/ingest/{store}.h5"


def stage_params(stage):
    return lambda wildcards: stage_json(config, wildcards.cohort, stage)


rule all:
    default_target: True
    input:
        expand("results/{cohort}/train/model.pt", cohort=COHORTS),
        CORRUPTED,
        expand("results/{cohort}/sample/grid.png", cohort=COHORTS),
        expand("results/{cohort}/eval/metrics.json", cohort=COHORTS),
        expand("results/{cohort}/eval/memorization.json", cohort=COHORTS),
        expand("results/{cohort}/reconstruct/metrics.json", cohort=COHORTS),
        expand("results/{cohort}/bundle", cohort=COHORTS),
        expand("results/{pool}/sample/grid.png", pool=POOLS),
        [
            f"results/{pool}/eval/{cohort}/memorization.json"
            for pool, cohort in POOL_AUDITS
        ],
    localrule: True


rule train:
    input:
        expand("results/{cohort}/train/model.pt", cohort=COHORTS + POOLS),
    localrule: True


rule demo_data:
    output:
        directory("data/{cohort}"),
    log:
        "results/{cohort}/logs/demo_data.log",
    benchmark:
        "results/{cohort}/benchmarks/demo_data.tsv"
    conda:
        ENV
    threads: 2
    params:
        version=__version__,
        cfg=stage_params("demo_data"),
    shell:
        "ambient-med demo-data --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --output {output} 2> {log}"


rule ingest:
    input:
        cohort_input,
    output:
        slices="results/{cohort}/ingest/slices.h5",
        raw="results/{cohort}/ingest/raw.h5",
        manifest="results/{cohort}/ingest/manifest.csv",
    log:
        "results/{cohort}/logs/ingest.log",
    benchmark:
        "results/{cohort}/benchmarks/ingest.tsv"
    conda:
        ENV
    threads: 2
    params:
        version=__version__,
        cfg=stage_params("ingest"),
    shell:
        "ambient-med ingest --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --input {input} --slices {output.slices} "
        "--raw {output.raw} --manifest {output.manifest} 2> {log}"


rule corrupt:
    input:
        corrupt_input,
    output:
        store="results/{cohort}/corrupt/{kind}.h5",
        examples=report(
            "results/{cohort}/corrupt/{kind}_examples.png",
            caption="config/report/corrupt_examples.rst",
            category="What training saw",
            subcategory="{cohort}",
            labels={"cohort": "{cohort}", "corruption": "{kind}"},
        ),
    log:
        "results/{cohort}/logs/corrupt_{kind}.log",
    benchmark:
        "results/{cohort}/benchmarks/corrupt_{kind}.tsv"
    conda:
        ENV
    threads: 1
    params:
        version=__version__,
        cfg=stage_params("corrupt"),
        source=lambda wildcards: "--raw" if wildcards.kind == "native" else "--slices",
    shell:
        "ambient-med corrupt --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --kind {wildcards.kind} {params.source} {input} "
        "--output {output.store} --examples {output.examples} 2> {log}"


def train_launcher(wildcards):
    """`ambient-med`, or torchrun starting train.distributed's data-parallel processes."""
    dist = config["train"]["distributed"]
    if dist["nproc_per_node"] * dist["nnodes"] == 1:
        return "ambient-med"
    if dist["rdzv_endpoint"]:
        rendezvous = f"--rdzv-backend c10d --rdzv-endpoint {dist['rdzv_endpoint']}"
    else:
        rendezvous = "--standalone"
    return (
        f"torchrun --nnodes {dist['nnodes']} --nproc-per-node {dist['nproc_per_node']} "
        f"{rendezvous} -m ambient_med"
    )


def train_gpus(wildcards):
    """GPUs per node the scheduler must grant: one per process on CUDA, none on CPU."""
    if config["train"]["device"] != "cuda":
        return 0
    return config["train"]["distributed"]["nproc_per_node"]


rule train_model:
    input:
        train_input,
    output:
        model="results/{cohort}/train/model.pt",
        loss="results/{cohort}/train/loss.csv",
        plot=report(
            "results/{cohort}/train/loss.png",
            caption="config/report/loss.rst",
            category="Training",
            subcategory="{cohort}",
        ),
        provenance=report(
            "results/{cohort}/train/provenance.tsv",
            caption="config/report/provenance.rst",
            category="Provenance",
            subcategory="{cohort}",
        ),
    log:
        "results/{cohort}/logs/train.log",
    benchmark:
        "results/{cohort}/benchmarks/train.tsv"
    conda:
        ENV
    threads: 8
    resources:
        gpu=train_gpus,
        nodes=lambda wildcards: config["train"]["distributed"]["nnodes"],
    params:
        version=__version__,
        cfg=stage_params("train"),
        checkpoints=lambda wildcards: f"results/{wildcards.cohort}/train/checkpoints",
        launcher=train_launcher,
    shell:
        "{params.launcher} train --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --input {input} --model {output.model} "
        "--loss-log {output.loss} --checkpoints {params.checkpoints} "
        "--loss-plot {output.plot} --provenance {output.provenance} 2> {log}"


rule sample:
    input:
        model="results/{cohort}/train/model.pt",
        measurements=measurements,
    output:
        nifti="results/{cohort}/sample/samples.nii.gz",
        grid=report(
            "results/{cohort}/sample/grid.png",
            caption="config/report/samples.rst",
            category="Samples",
            subcategory="{cohort}",
        ),
    log:
        "results/{cohort}/logs/sample.log",
    benchmark:
        "results/{cohort}/benchmarks/sample.tsv"
    conda:
        ENV
    threads: 8
    params:
        version=__version__,
        cfg=stage_params("sample"),
    shell:
        "ambient-med sample --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --model {input.model} --measurements {input.measurements} "
        "--nifti {output.nifti} --grid {output.grid} 2> {log}"


def new_scans(wildcards):
    """The folder of new raw k-space files to reconstruct, when configured."""
    folder = config["reconstruct"]["input"]
    return [folder] if folder else []


rule reconstruct:
    input:
        model="results/{cohort}/train/model.pt",
        slices="results/{cohort}/ingest/slices.h5",
        new_scans=new_scans,
    output:
        files=report(
            directory("results/{cohort}/reconstruct/files"),
            patterns=["panel_{acceleration}.png"],
            caption="config/report/reconstruction.rst",
            category="Reconstruction",
            subcategory="{cohort}",
        ),
        metrics="results/{cohort}/reconstruct/metrics.json",
    log:
        "results/{cohort}/logs/reconstruct.log",
    benchmark:
        "results/{cohort}/benchmarks/reconstruct.tsv"
    conda:
        ENV
    threads: 8
    params:
        version=__version__,
        cfg=stage_params("reconstruct"),
    shell:
        "ambient-med reconstruct --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --model {input.model} --slices {input.slices} "
        "--files {output.files} --metrics {output.metrics} 2> {log}"


rule audit:
    input:
        samples="results/{cohort}/sample/samples.nii.gz",
        slices="results/{cohort}/ingest/slices.h5",
        measurements=measurements,
    output:
        memorization="results/{cohort}/eval/memorization.json",
        table=report(
            "results/{cohort}/eval/memorization.tsv",
            caption="config/report/memorization.rst",
            category="Memorization audit",
            subcategory="{cohort}",
        ),
        figure=report(
            "results/{cohort}/eval/closest_pairs.png",
            caption="config/report/closest_pairs.rst",
            category="Memorization audit",
            subcategory="{cohort}",
        ),
        histogram=report(
            "results/{cohort}/eval/audit_histogram.png",
            caption="config/report/audit_histogram.rst",
            category="Memorization audit",
            subcategory="{cohort}",
        ),
    log:
        "results/{cohort}/logs/audit.log",
    benchmark:
        "results/{cohort}/benchmarks/audit.tsv"
    conda:
        ENV
    threads: 8
    params:
        version=__version__,
        cfg=stage_params("audit"),
    shell:
        "ambient-med audit --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --samples {input.samples} --slices {input.slices} "
        "--measurements {input.measurements} --memorization {output.memorization} "
        "--figure {output.figure} --table {output.table} "
        "--histogram {output.histogram} 2> {log}"


rule pool_audit:
    input:
        samples="results/{pool}/sample/samples.nii.gz",
        slices="results/{cohort}/ingest/slices.h5",
        measurements=lambda wildcards: measurement_store(wildcards.cohort),
    output:
        memorization="results/{pool}/eval/{cohort}/memorization.json",
        figure="results/{pool}/eval/{cohort}/closest_pairs.png",
    log:
        "results/{pool}/logs/audit_{cohort}.log",
    benchmark:
        "results/{pool}/benchmarks/audit_{cohort}.tsv"
    conda:
        ENV
    threads: 8
    params:
        version=__version__,
        cfg=lambda wildcards: stage_json(config, wildcards.cohort, "audit"),
    shell:
        "ambient-med audit --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --samples {input.samples} --slices {input.slices} "
        "--measurements {input.measurements} --memorization {output.memorization} "
        "--figure {output.figure} 2> {log}"


rule bundle:
    input:
        model="results/{cohort}/train/model.pt",
    output:
        directory("results/{cohort}/bundle"),
    log:
        "results/{cohort}/logs/bundle.log",
    benchmark:
        "results/{cohort}/benchmarks/bundle.tsv"
    conda:
        ENV
    threads: 1
    params:
        version=__version__,
        cfg=stage_params("bundle"),
    shell:
        "ambient-med bundle --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --model {input.model} --output {output} 2> {log}"


rule evaluate:
    input:
        model="results/{cohort}/train/model.pt",
        slices="results/{cohort}/ingest/slices.h5",
        measurements=measurements,
        samples="results/{cohort}/sample/samples.nii.gz",
        reconstruction="results/{cohort}/reconstruct/metrics.json",
    output:
        metrics="results/{cohort}/eval/metrics.json",
        table=report(
            "results/{cohort}/eval/metrics.tsv",
            caption="config/report/metrics.rst",
            category="Metrics",
            subcategory="{cohort}",
        ),
    log:
        "results/{cohort}/logs/evaluate.log",
    benchmark:
        "results/{cohort}/benchmarks/evaluate.tsv"
    conda:
        ENV
    threads: 8
    params:
        version=__version__,
        cfg=stage_params("evaluate"),
    shell:
        "ambient-med evaluate --cohort {wildcards.cohort} --config-json {params.cfg:q} "
        "--threads {threads} --model {input.model} --slices {input.slices} "
        "--measurements {input.measurements} --samples {input.samples} "
        "--metrics {output.metrics} --table {output.table} "
        "--reconstruction {input.reconstruction} 2> {log}"
