(* Planted lemmas for mathmill's formal pipeline tests (written for this project,
   Apache-2.0). Plain Coq: no library beyond the prelude. *)
Require Import Arith Lia.

Notation "x +++ y" := (x + y + 0) (at level 50, left associativity).

Lemma add_zero_r : forall n : nat, n + 0 = n.
Proof.
  intros n.
  induction n as [| n IH].
  - reflexivity.
  - simpl. rewrite IH. reflexivity.
Qed.

Lemma add_succ_r : forall n m : nat, n + S m = S (n + m).
Proof.
  intros n m.
  induction n as [| n IH].
  - reflexivity.
  - simpl.
    rewrite IH.
    reflexivity.
Qed.

Lemma add_comm' : forall n m : nat, n + m = m + n.
Proof.
  intros n m.
  induction n as [| n IH].
  - simpl. rewrite add_zero_r. reflexivity.
  - simpl. rewrite IH. rewrite add_succ_r. reflexivity.
Qed.

Lemma triple_plus : forall a : nat, a +++ a = 2 * a.
Proof.
  intros a.
  rewrite !add_zero_r.
  simpl.
  rewrite add_zero_r.
  reflexivity.
Qed.

Lemma double_even : forall n : nat, exists k, n + n = 2 * k.
Proof.
  intros n.
  exists n.
  simpl.
  rewrite add_zero_r.
  reflexivity.
Qed.

Lemma le_add_both : forall a b c : nat, a <= b -> a + c <= b + c.
Proof.
  intros a b c H.
  induction c as [| c IH].
  - rewrite !add_zero_r. exact H.
  - rewrite !add_succ_r. apply le_n_S. exact IH.
Qed.

Lemma mul_two_r : forall n : nat, n * 2 = n + n.
Proof.
  intros n.
  rewrite Nat.mul_comm.
  simpl.
  rewrite add_zero_r.
  reflexivity.
Qed.

Lemma one_step : forall n : nat, n = n.
Proof. reflexivity. Qed.

Lemma broken_swap : forall n m : nat, n - m = m - n.
Proof.
  intros n m.
  induction n as [| n IH].
  - reflexivity.
  - simpl. rewrite IH. reflexivity.
Qed.

Lemma after_broken : forall n : nat, 0 + n = n.
Proof.
  intros n.
  simpl.
  reflexivity.
Qed.
