rule sample:
    input:
        train=str(P.train),
        sft=str(P.sft),
    output:
        str(P.samples),
    threads: 2
    log:
        str(P.logs("sample")),
    shell:
        rlhf("sample")


rule label:
    input:
        str(P.samples),
    output:
        str(P.labels),
    log:
        str(P.logs("label")),
    shell:
        rlhf("label")
