rule sample:
    input:
        train=str(P.train),
        sft=str(P.sft),
    output:
        str(P.samples),
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
    threads: threads("label")
    resources:
        **job_resources("label"),
    log:
        str(P.logs("label")),
    shell:
        rlhf("label")
