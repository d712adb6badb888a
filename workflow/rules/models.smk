if "build" in config["model"]:

    rule base:
        output:
            directory(str(P.base)),
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
    threads: 2
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
    threads: 2
    log:
        str(P.logs("rm")),
    shell:
        rlhf("rm")
