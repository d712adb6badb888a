rule sample:
    input:
        train=str(P.train),
        sft=str(P.sft),
    output:
        str(P.samples),
    conda:
        conda_env("sample")
    threads: threads("sample")
    resources:
        **job_resources("sample"),
    log:
        str(P.logs("sample")),
    shell:
        rlhf("sample")


rule label:
    input:
        str(P.samples),
    output:
        str(P.labels),
    conda:
        conda_env("label")
    threads: threads("label")
    resources:
        **job_resources("label"),
    log:
        str(P.logs("label")),
    shell:
        rlhf("label")
