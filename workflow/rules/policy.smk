rule grpo:
    input:
        unpack(inputs("grpo")),
    output:
        **outputs("grpo"),
    params:
        **params("grpo"),
    priority: 5  # the long jobs first: the short evaluations fill the cores at the end
    conda:
        conda_env("grpo")
    threads: threads("grpo")
    resources:
        **job_resources("grpo"),
    log:
        log("grpo"),
    shell:
        rlhf("grpo")


rule evaluate:
    input:
        unpack(inputs("evaluate")),
    output:
        **outputs("evaluate"),
    params:
        **params("evaluate"),
    conda:
        conda_env("evaluate")
    threads: threads("evaluate")
    resources:
        **job_resources("evaluate"),
    log:
        log("evaluate"),
    shell:
        rlhf("evaluate")


if dpo_methods(config):

    rule dpo:
        input:
            unpack(inputs("dpo")),
        output:
            **outputs("dpo"),
        params:
            **params("dpo"),
        priority: 5
        conda:
            conda_env("dpo")
        threads: threads("dpo")
        resources:
            **job_resources("dpo"),
        log:
            log("dpo"),
        shell:
            rlhf("dpo")
