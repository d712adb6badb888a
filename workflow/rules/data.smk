rule data:
    input:
        unpack(inputs("data")),
    output:
        **outputs("data"),
    params:
        **params("data"),
    priority: 6
    conda:
        conda_env("data")
    threads: threads("data")
    resources:
        **job_resources("data"),
    log:
        log("data"),
    shell:
        rlhf("data")
