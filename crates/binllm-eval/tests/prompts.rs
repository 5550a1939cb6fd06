//! Prompt construction against lm-evaluation-harness v0.4's task definitions, on the first
//! example of every shared file. The expected strings were written from the task yamls
//! (quoted above each test) and checked against the requests lm-eval 0.4.13's own task
//! code builds from the same rows (tools/reference/eval_reference.py prepare).

mod common;

use binllm_eval::tasks::{self, hellaswag_preprocess, Task};
use binllm_eval::McExample;

fn first(task: Task) -> McExample {
    task.load(&common::data_dir())
        .unwrap_or_else(|e| panic!("{}: {e:#}", task.name()))
        .remove(0)
}

fn contexts(e: &McExample) -> Vec<&str> {
    e.requests.iter().map(|(c, _)| c.as_str()).collect()
}

fn continuations(e: &McExample) -> Vec<&str> {
    e.requests.iter().map(|(_, c)| c.as_str()).collect()
}

/// super_glue/boolq/default.yaml: doc_to_text "{{passage}}\nQuestion: {{question}}?\nAnswer:",
/// doc_to_choice ["no", "yes"], doc_to_target label; super_glue's passage is
/// "<title> -- <passage>"; target_delimiter " ".
#[test]
fn boolq_first_example() {
    let e = first(Task::BoolQ);
    let passage = "All biomass goes through at least some of these steps: it needs to be grown, collected, dried, fermented, distilled, and burned. All of these steps require resources and an infrastructure. The total amount of energy input into the process compared to the energy released by burning the resulting ethanol fuel is known as the energy balance (or ``energy returned on energy invested''). Figures compiled in a 2007 report by National Geographic Magazine point to modest results for corn ethanol produced in the US: one unit of fossil-fuel energy is required to create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane ethanol produced in Brazil is more favorable, with one unit of fossil-fuel energy required to create 8 from the ethanol. Energy balance estimates are not easily produced, thus numerous such reports have been generated that are contradictory. For instance, a separate survey reports that production of ethanol from sugarcane, which requires a tropical climate to grow productively, returns from 8 to 9 units of energy for each unit expended, as compared to corn, which only returns about 1.34 units of fuel energy for each unit of energy expended. A 2006 University of California Berkeley study, after analyzing six separate studies, concluded that producing ethanol from corn uses much less petroleum than producing gasoline.";
    let context = format!(
        "Ethanol fuel -- {passage}\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    );
    assert_eq!(contexts(&e), [context.as_str(), context.as_str()]);
    assert_eq!(continuations(&e), [" no", " yes"]);
    assert_eq!(e.gold, 0, "answer false -> label 0 -> \"no\"");
    assert_eq!(e.choice_chars, [2, 3]);
}

/// piqa.yaml: doc_to_text "Question: {{goal}}\nAnswer:", doc_to_choice [sol1, sol2],
/// doc_to_target label (valid-labels.lst).
#[test]
fn piqa_first_example() {
    let e = first(Task::Piqa);
    let ctx = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:";
    assert_eq!(contexts(&e), [ctx, ctx]);
    assert_eq!(
        continuations(&e),
        [
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.",
        ]
    );
    assert_eq!(e.gold, 0);
    // acc_norm divides by len(choice) in characters, without the delimiter.
    assert_eq!(e.choice_chars, [164, 166]);
}

/// hellaswag.yaml + utils.py: doc_to_text "{{query}}" with query =
/// preprocess(activity_label + ": " + ctx), doc_to_choice = preprocess(endings),
/// doc_to_target label. The shared file's line 1 is already activity_label + ": " + ctx.
#[test]
fn hellaswag_first_example() {
    let e = first(Task::HellaSwag);
    let ctx = "Roof shingle removal: A man is sitting on a roof. he";
    assert_eq!(contexts(&e), [ctx; 4]);
    assert_eq!(
        continuations(&e),
        [
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ]
    );
    assert_eq!(e.gold, 3);
    assert_eq!(e.choice_chars, [37, 27, 26, 36]);
}

/// utils.preprocess: strip; " [title]" -> ". "; re.sub("\\[.*?\\]", ""); "  " -> " " once.
#[test]
fn hellaswag_preprocess_follows_lm_eval() {
    assert_eq!(
        hellaswag_preprocess(
            "  Making a cake: [header] How to bake [title] Mix flour. [step] Stir.  "
        ),
        // strip first; then " [title]" -> ". " gives "bake. Mix"; [header]/[step] vanish,
        // leaving double spaces that one pass of "  " -> " " folds.
        "Making a cake: How to bake. Mix flour. Stir."
    );
    // An unmatched "[" stays; the match is lazy (nearest "]").
    assert_eq!(hellaswag_preprocess("a [b] c [d"), "a c [d");
    assert_eq!(hellaswag_preprocess("x [a]]y"), "x ]y");
    // One non-overlapping pass: three spaces become two.
    assert_eq!(hellaswag_preprocess("a   b"), "a  b");
}

/// winogrande/preprocess_winogrande.py: doc_to_choice = [sentence[:idx] + option for both
/// options], doc_to_target = sentence[idx + 1:].strip(), gold = {"1": 0, "2": 1}[answer];
/// multiple_input: each choice is a context, the continuation " " + target is shared.
#[test]
fn winogrande_first_example() {
    let e = first(Task::WinoGrande);
    assert_eq!(
        contexts(&e),
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ]
    );
    assert_eq!(continuations(&e), [" always got the easier cases."; 2]);
    assert_eq!(e.gold, 1, "answer \"2\" -> index 1");
}

/// arc_easy.yaml (arc_challenge includes it): "Question: {{question}}\nAnswer:",
/// doc_to_choice choices.text, doc_to_target choices.label.index(answerKey).
#[test]
fn arc_first_examples() {
    let e = first(Task::ArcEasy);
    let ctx = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:";
    assert_eq!(contexts(&e), [ctx; 4]);
    assert_eq!(
        continuations(&e),
        [
            " Sunlight is the source of energy for nearly all ecosystems.",
            " Most ecosystems are found on land instead of in water.",
            " Carbon dioxide is more available than other gases.",
            " The producers in all ecosystems are plants.",
        ]
    );
    assert_eq!(e.gold, 0);

    let e = first(Task::ArcChallenge);
    let ctx = "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:";
    assert_eq!(contexts(&e), [ctx; 4]);
    assert_eq!(
        continuations(&e),
        [
            " Planetary density will decrease.",
            " Planetary years will become longer.",
            " Planetary days will become shorter.",
            " Planetary gravity will become stronger.",
        ]
    );
    assert_eq!(e.gold, 2, "answerKey C");
}

/// openbookqa.yaml: doc_to_text question_stem (no "Question:" wrapper), doc_to_choice
/// choices.text, doc_to_target choices.label.index(answerKey.lstrip()).
#[test]
fn openbookqa_first_example() {
    let e = first(Task::OpenBookQa);
    let ctx = "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking over their budget and expenses, they decide the best way to save money is to";
    assert_eq!(contexts(&e), [ctx; 4]);
    assert_eq!(
        continuations(&e),
        [
            " make more phone calls",
            " quit eating lunch out",
            " buy less with monopoly money",
            " have lunch with friends",
        ]
    );
    assert_eq!(e.gold, 1, "answerKey B");
}

/// Every shared file loads whole, with the sizes MANIFEST.tsv states.
#[test]
fn every_task_file_loads() {
    let expected = [
        (Task::BoolQ, 3270),
        (Task::Piqa, 1838),
        (Task::HellaSwag, 10042),
        (Task::WinoGrande, 1267),
        (Task::ArcEasy, 2376),
        (Task::ArcChallenge, 1172),
        (Task::OpenBookQa, 500),
    ];
    for (task, n) in expected {
        let examples = task.load(&common::data_dir()).unwrap();
        assert_eq!(examples.len(), n, "{}", task.name());
        for e in &examples {
            assert!(e.gold < e.requests.len(), "{} {}", task.name(), e.doc_id);
            assert_eq!(e.choice_chars.len(), e.requests.len());
        }
    }
}

/// lm-eval's task names and the aliases the CLI accepts.
#[test]
fn task_names_parse() {
    for task in Task::ALL {
        assert_eq!(task.name().parse::<Task>().unwrap(), task);
    }
    assert_eq!("arc-e".parse::<Task>().unwrap(), Task::ArcEasy);
    assert_eq!("OBQA".parse::<Task>().unwrap(), Task::OpenBookQa);
    assert!("mmlu".parse::<Task>().is_err());
    let list = binllm_eval::parse_benchmarks("wikitext2,c4,ptb,boolq,arc_challenge").unwrap();
    assert_eq!(list.len(), 5);
    assert_eq!(binllm_eval::parse_benchmarks("all").unwrap().len(), 10);
    assert!(binllm_eval::parse_benchmarks("wikitext2,nope").is_err());
    // Defaults: every example, no progress bar (the CLI turns it on).
    let defaults = tasks::TaskOptions::default();
    assert_eq!(defaults.limit, None);
    assert!(!defaults.show_progress);
}
