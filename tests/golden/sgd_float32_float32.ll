; ModuleID = "sgd_float32_float32"
target triple = "<host>"
target datalayout = "<host>"

define internal void @"stepjit_sgd_float32_float32_466774c6_update_body"(ptr noalias %"param", ptr noalias %"grad", float %"lr", float %"scale", i64 %"begin", i64 %"end")
{
entry:
  %".8" = icmp slt i64 %"begin", %"end"
  br i1 %".8", label %"loop", label %"done"
loop:
  %"i" = phi  i64 [%"begin", %"entry"], [%"i.next", %"loop"]
  %".10" = getelementptr inbounds float, ptr %"param", i64 %"i"
  %"v0.load" = load float, ptr %".10", align 4
  %".12" = getelementptr inbounds float, ptr %"grad", i64 %"i"
  %"v3.load" = load float, ptr %".12", align 4
  %"v4.mul" = fmul contract float %"scale", %"v3.load"
  %"v5.mul" = fmul contract float %"lr", %"v4.mul"
  %"v6.sub" = fsub contract float %"v0.load", %"v5.mul"
  %".17" = getelementptr inbounds float, ptr %"param", i64 %"i"
  store float %"v6.sub", ptr %".17", align 4
  %"i.next" = add i64 %"i", 1
  %".19" = icmp slt i64 %"i.next", %"end"
  br i1 %".19", label %"loop", label %"done"
done:
  ret void
}

define void @"stepjit_sgd_float32_float32_466774c6_update"(ptr %"ptrs", ptr %"chunks", ptr %"tchunks", ptr %"partials", ptr %"per_tensor", ptr %"scalars", i64 %"c0", i64 %"c1")
{
entry:
  %".10" = getelementptr double, ptr %"scalars", i64 0
  %".11" = load double, ptr %".10"
  %"lr" = fptrunc double %".11" to float
  %".13" = getelementptr double, ptr %"scalars", i64 1
  %".14" = load double, ptr %".13"
  %"scale" = fptrunc double %".14" to float
  %".16" = icmp slt i64 %"c0", %"c1"
  br i1 %".16", label %"chunk", label %"done"
chunk:
  %"c" = phi  i64 [%"c0", %"entry"], [%".36", %"chunk"]
  %".18" = mul i64 %"c", 3
  %".19" = getelementptr i64, ptr %"chunks", i64 %".18"
  %".20" = load i64, ptr %".19"
  %".21" = add i64 %".18", 1
  %".22" = getelementptr i64, ptr %"chunks", i64 %".21"
  %".23" = load i64, ptr %".22"
  %".24" = add i64 %".18", 2
  %".25" = getelementptr i64, ptr %"chunks", i64 %".24"
  %".26" = load i64, ptr %".25"
  %".27" = mul i64 %".20", 2
  %".28" = add i64 %".27", 0
  %".29" = getelementptr ptr, ptr %"ptrs", i64 %".28"
  %".30" = load ptr, ptr %".29"
  %".31" = mul i64 %".20", 2
  %".32" = add i64 %".31", 1
  %".33" = getelementptr ptr, ptr %"ptrs", i64 %".32"
  %".34" = load ptr, ptr %".33"
  call void @"stepjit_sgd_float32_float32_466774c6_update_body"(ptr %".30", ptr %".34", float %"lr", float %"scale", i64 %".23", i64 %".26")
  %".36" = add i64 %"c", 1
  %".37" = icmp slt i64 %".36", %"c1"
  br i1 %".37", label %"chunk", label %"done"
done:
  ret void
}
