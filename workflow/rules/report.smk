rule certify:
    input:
        unpack(inputs("certify")),
    output:
        **outputs("certify"),
    params:
        **params("certify"),
    priority: 10  # start beside the first GRPO jobs instead of idling a core at the end
    conda:
        conda_env("certify")
    threads: threads("certify")
    resources:
        **job_resources("certify"),
    log:
        log("certify"),
    shell:
        rlhf("certify")


rule report:
    input:
        unpack(inputs("report")),
    output:
        **outputs("report"),
    params:
        **params("report"),
    conda:
        conda_env("report")
    threads: threads("report")
    resources:
        **job_resources("report"),
    log:
        log("report"),
    shell:
        rlhf("report")
