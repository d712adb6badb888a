if "build" in config["model"]:

    rule base:
        input:
            unpack(inputs("base")),
        output:
            **outputs("base"),
        params:
            **params("base"),
        priority: 6
        conda:
            conda_env("base")
        threads: threads("base")
        resources:
            **job_resources("base"),
        log:
            log("base"),
        shell:
            rlhf("base")


rule sft:
    input:
        unpack(inputs("sft")),
    output:
        **outputs("sft"),
    params:
        **params("sft"),
    priority: 6  # stages the policies wait on go first: a late RM would leave its GRPO runs to end the DAG alone
    conda:
        conda_env("sft")
    threads: threads("sft")
    resources:
        **job_resources("sft"),
    log:
        log("sft"),
    shell:
        rlhf("sft")


rule rm:
    input:
        unpack(inputs("rm")),
    output:
        **outputs("rm"),
    params:
        **params("rm"),
    priority: 6
    conda:
        conda_env("rm")
    threads: threads("rm")
    resources:
        **job_resources("rm"),
    log:
        log("rm"),
    shell:
        rlhf("rm")


if ensemble_members(config):

    rule rm_member:
        input:
            unpack(inputs("rm_member")),
        output:
            **outputs("rm_member"),
        params:
            **params("rm_member"),
        priority: 6
        conda:
            conda_env("rm_member")
        threads: threads("rm_member")
        resources:
            **job_resources("rm_member"),
        log:
            log("rm_member"),
        shell:
            rlhf("rm_member")


if advpo_used(config):

    rule advpo:
        input:
            unpack(inputs("advpo")),
        output:
            **outputs("advpo"),
        params:
            **params("advpo"),
        priority: 6
        conda:
            conda_env("advpo")
        threads: threads("advpo")
        resources:
            **job_resources("advpo"),
        log:
            log("advpo"),
        shell:
            rlhf("advpo")


if bspo_used(config):

    rule bspo:
        input:
            unpack(inputs("bspo")),
        output:
            **outputs("bspo"),
        params:
            **params("bspo"),
        priority: 6
        conda:
            conda_env("bspo")
        threads: threads("bspo")
        resources:
            **job_resources("bspo"),
        log:
            log("bspo"),
        shell:
            rlhf("bspo")
