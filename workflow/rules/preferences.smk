rule sample:
    input:
        unpack(inputs("sample")),
    output:
        **outputs("sample"),
    params:
        **params("sample"),
    priority: 6
    conda:
        conda_env("sample")
    threads: threads("sample")
    resources:
        **job_resources("sample"),
    log:
        log("sample"),
    shell:
        rlhf("sample")


rule label:
    input:
        unpack(inputs("label")),
    output:
        **outputs("label"),
    params:
        **params("label"),
    priority: 6
    conda:
        conda_env("label")
    threads: threads("label")
    resources:
        **job_resources("label"),
    log:
        log("label"),
    shell:
        rlhf("label")
