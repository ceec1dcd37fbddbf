(* A planted file for the replay tests: good, broken, dependent, looping proofs. *)
From mathcomp Require Import ssreflect ssrnat.

Lemma good_add n : n + 0 = n.
Proof.
elim: n => [|n IHn].
  by [].
by rewrite addSn IHn.
Qed.

Lemma broken_add m n : m + n = n + m.
Proof.
rewrite mulnC.
by [].
Qed.

Lemma uses_broken a b : a + b + 0 = b + a.
Proof.
rewrite addn0.
by rewrite broken_add.
Qed.

Lemma loops : True.
Proof.
do 1000000000 idtac.
exact I.
Qed.

Lemma after_loop n : 0 + n = n.
Proof. by []. Qed.

Lemma bullets (P Q : Prop) (p : P) (q : Q) : P /\ Q.
Proof.
split.
- exact p.
- { exact q. }
Qed.
