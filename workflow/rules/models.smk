if "build" in config["model"]:

    rule base:
        output:
            directory(str(P.base)),
        conda:
            conda_env("base")
        threads: threads("base")
        resources:
            **job_resources("base"),
        log:
            str(P.logs("base")),
        shell:
            rlhf("base")


rule sft:
    input:
        train=str(P.train),
        base=[str(P.base)] if "build" in config["model"] else [],
    output:
        directory(str(P.sft)),
    conda:
        conda_env("sft")
    threads: threads("sft")
    resources:
        **job_resources("sft"),
    log:
        str(P.logs("sft")),
    shell:
        rlhf("sft")


rule rm:
    input:
        labels=str(P.labels),
        sft=str(P.sft),
    output:
        directory(str(P.rm)),
    conda:
        conda_env("rm")
    threads: threads("rm")
    resources:
        **job_resources("rm"),
    log:
        str(P.logs("rm")),
    shell:
        rlhf("rm")
