; ModuleID = "sgd_momentum_clip_bfloat16_bfloat16"
target triple = "<host>"
target datalayout = "<host>"

define internal void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_reduce_body"(ptr noalias %"grad", float %"scale", i64 %"begin", i64 %"end", ptr %".5")
{
entry:
  %".7" = icmp slt i64 %"begin", %"end"
  br i1 %".7", label %"loop", label %"done"
loop:
  %"i" = phi  i64 [%"begin", %"entry"], [%"i.next", %"loop"]
  %"sum0" = phi  double [             0x0, %"entry"], [%".17", %"loop"]
  %".9" = getelementptr inbounds i16, ptr %"grad", i64 %"i"
  %"v5.load" = load i16, ptr %".9", align 2
  %".11" = zext i16 %"v5.load" to i32
  %".12" = shl i32 %".11", 16
  %"v6.cast" = bitcast i32 %".12" to float
  %"v7.mul" = fmul contract float %"scale", %"v6.cast"
  %"v9.cast" = fpext float %"v7.mul" to double
  %"v10.mul" = fmul contract double %"v9.cast", %"v9.cast"
  %".17" = fadd reassoc contract double %"sum0", %"v10.mul"
  %"i.next" = add i64 %"i", 1
  %".18" = icmp slt i64 %"i.next", %"end"
  br i1 %".18", label %"loop", label %"done"
done:
  %".20" = phi  double [             0x0, %"entry"], [%".17", %"loop"]
  %".21" = getelementptr double, ptr %".5", i64 0
  store double %".20", ptr %".21", align 8
  ret void
}

define void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_reduce"(ptr %"ptrs", ptr %"chunks", ptr %"tchunks", ptr %"partials", ptr %"per_tensor", ptr %"scalars", i64 %"c0", i64 %"c1")
{
entry:
  %".10" = getelementptr double, ptr %"scalars", i64 0
  %"clip_norm" = load double, ptr %".10"
  %".12" = getelementptr double, ptr %"scalars", i64 1
  %".13" = load double, ptr %".12"
  %"dampening" = fptrunc double %".13" to float
  %".15" = getelementptr double, ptr %"scalars", i64 2
  %".16" = load double, ptr %".15"
  %"lr" = fptrunc double %".16" to float
  %".18" = getelementptr double, ptr %"scalars", i64 3
  %".19" = load double, ptr %".18"
  %"momentum" = fptrunc double %".19" to float
  %".21" = getelementptr double, ptr %"scalars", i64 4
  %".22" = load double, ptr %".21"
  %"scale" = fptrunc double %".22" to float
  %".24" = icmp slt i64 %"c0", %"c1"
  br i1 %".24", label %"chunk", label %"done"
chunk:
  %"c" = phi  i64 [%"c0", %"entry"], [%".55", %"chunk"]
  %".26" = mul i64 %"c", 3
  %".27" = getelementptr i64, ptr %"chunks", i64 %".26"
  %".28" = load i64, ptr %".27"
  %".29" = add i64 %".26", 1
  %".30" = getelementptr i64, ptr %"chunks", i64 %".29"
  %".31" = load i64, ptr %".30"
  %".32" = add i64 %".26", 2
  %".33" = getelementptr i64, ptr %"chunks", i64 %".32"
  %".34" = load i64, ptr %".33"
  %".35" = mul i64 %".28", 3
  %".36" = add i64 %".35", 0
  %".37" = getelementptr ptr, ptr %"ptrs", i64 %".36"
  %".38" = load ptr, ptr %".37"
  %".39" = mul i64 %".28", 3
  %".40" = add i64 %".39", 1
  %".41" = getelementptr ptr, ptr %"ptrs", i64 %".40"
  %".42" = load ptr, ptr %".41"
  %".43" = mul i64 %".28", 3
  %".44" = add i64 %".43", 2
  %".45" = getelementptr ptr, ptr %"ptrs", i64 %".44"
  %".46" = load ptr, ptr %".45"
  %".47" = mul i64 %".28", 1
  %".48" = add i64 %".47", 0
  %".49" = getelementptr double, ptr %"per_tensor", i64 %".48"
  %".50" = load double, ptr %".49"
  %"first" = fcmp une double %".50",              0x0
  %".52" = mul i64 %"c", 1
  %".53" = getelementptr double, ptr %"partials", i64 %".52"
  call void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_reduce_body"(ptr %".42", float %"scale", i64 %".31", i64 %".34", ptr %".53")
  %".55" = add i64 %"c", 1
  %".56" = icmp slt i64 %".55", %"c1"
  br i1 %".56", label %"chunk", label %"done"
done:
  ret void
}

define internal void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_update_body"(ptr noalias %"param", ptr noalias %"grad", ptr noalias %"momentum_buffer", float %"lr", i1 %"first", float %"scale", float %"v17.cast", float %"momentum", float %"v24.sub", i64 %"begin", i64 %"end")
{
entry:
  %".13" = icmp slt i64 %"begin", %"end"
  br i1 %".13", label %"loop", label %"done"
loop:
  %"i" = phi  i64 [%"begin", %"entry"], [%"i.next", %"loop"]
  %".15" = getelementptr inbounds i16, ptr %"param", i64 %"i"
  %"v0.load" = load i16, ptr %".15", align 2
  %".17" = zext i16 %"v0.load" to i32
  %".18" = shl i32 %".17", 16
  %"v1.cast" = bitcast i32 %".18" to float
  %".20" = getelementptr inbounds i16, ptr %"grad", i64 %"i"
  %"v5.load" = load i16, ptr %".20", align 2
  %".22" = zext i16 %"v5.load" to i32
  %".23" = shl i32 %".22", 16
  %"v6.cast" = bitcast i32 %".23" to float
  %"v7.mul" = fmul contract float %"scale", %"v6.cast"
  %"v18.mul" = fmul contract float %"v7.mul", %"v17.cast"
  %".27" = getelementptr inbounds float, ptr %"momentum_buffer", i64 %"i"
  %"v20.load" = load float, ptr %".27", align 4
  %"v21.mul" = fmul contract float %"momentum", %"v20.load"
  %"v25.mul" = fmul contract float %"v24.sub", %"v18.mul"
  %"v26.add" = fadd contract float %"v21.mul", %"v25.mul"
  %"v27.where" = select  i1 %"first", float %"v18.mul", float %"v26.add"
  %"v28.mul" = fmul contract float %"lr", %"v27.where"
  %"v29.sub" = fsub contract float %"v1.cast", %"v28.mul"
  %".35" = bitcast float %"v29.sub" to i32
  %".36" = lshr i32 %".35", 16
  %".37" = and i32 %".36", 1
  %".38" = add i32 32767, %".37"
  %".39" = add i32 %".35", %".38"
  %".40" = lshr i32 %".39", 16
  %".41" = lshr i32 %".35", 16
  %".42" = or i32 %".41", 64
  %".43" = fcmp uno float %"v29.sub", %"v29.sub"
  %".44" = select  i1 %".43", i32 %".42", i32 %".40"
  %"v30.cast" = trunc i32 %".44" to i16
  %".46" = getelementptr inbounds i16, ptr %"param", i64 %"i"
  store i16 %"v30.cast", ptr %".46", align 2
  %".48" = getelementptr inbounds float, ptr %"momentum_buffer", i64 %"i"
  store float %"v27.where", ptr %".48", align 4
  %"i.next" = add i64 %"i", 1
  %".50" = icmp slt i64 %"i.next", %"end"
  br i1 %".50", label %"loop", label %"done"
done:
  ret void
}

define void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_update"(ptr %"ptrs", ptr %"chunks", ptr %"tchunks", ptr %"partials", ptr %"per_tensor", ptr %"scalars", i64 %"c0", i64 %"c1")
{
entry:
  %".10" = getelementptr double, ptr %"scalars", i64 0
  %"clip_norm" = load double, ptr %".10"
  %".12" = getelementptr double, ptr %"scalars", i64 1
  %".13" = load double, ptr %".12"
  %"dampening" = fptrunc double %".13" to float
  %".15" = getelementptr double, ptr %"scalars", i64 2
  %".16" = load double, ptr %".15"
  %"lr" = fptrunc double %".16" to float
  %".18" = getelementptr double, ptr %"scalars", i64 3
  %".19" = load double, ptr %".18"
  %"momentum" = fptrunc double %".19" to float
  %".21" = getelementptr double, ptr %"scalars", i64 4
  %".22" = load double, ptr %".21"
  %"scale" = fptrunc double %".22" to float
  %".24" = icmp slt i64 %"c0", %"c1"
  br i1 %".24", label %"chunk", label %"done"
chunk:
  %"c" = phi  i64 [%"c0", %"entry"], [%".80", %"partials.done"]
  %".26" = mul i64 %"c", 3
  %".27" = getelementptr i64, ptr %"chunks", i64 %".26"
  %".28" = load i64, ptr %".27"
  %".29" = add i64 %".26", 1
  %".30" = getelementptr i64, ptr %"chunks", i64 %".29"
  %".31" = load i64, ptr %".30"
  %".32" = add i64 %".26", 2
  %".33" = getelementptr i64, ptr %"chunks", i64 %".32"
  %".34" = load i64, ptr %".33"
  %".35" = mul i64 %".28", 3
  %".36" = add i64 %".35", 0
  %".37" = getelementptr ptr, ptr %"ptrs", i64 %".36"
  %".38" = load ptr, ptr %".37"
  %".39" = mul i64 %".28", 3
  %".40" = add i64 %".39", 1
  %".41" = getelementptr ptr, ptr %"ptrs", i64 %".40"
  %".42" = load ptr, ptr %".41"
  %".43" = mul i64 %".28", 3
  %".44" = add i64 %".43", 2
  %".45" = getelementptr ptr, ptr %"ptrs", i64 %".44"
  %".46" = load ptr, ptr %".45"
  %".47" = mul i64 %".28", 1
  %".48" = add i64 %".47", 0
  %".49" = getelementptr double, ptr %"per_tensor", i64 %".48"
  %".50" = load double, ptr %".49"
  %"first" = fcmp une double %".50",              0x0
  %".52" = mul i64 %".28", 2
  %".53" = getelementptr i64, ptr %"tchunks", i64 %".52"
  %".54" = load i64, ptr %".53"
  %".55" = mul i64 %".28", 2
  %".56" = add i64 %".55", 1
  %".57" = getelementptr i64, ptr %"tchunks", i64 %".56"
  %".58" = load i64, ptr %".57"
  %".59" = add i64 %".54", %".58"
  %".60" = icmp slt i64 %".54", %".59"
  br i1 %".60", label %"partials.1", label %"partials.done"
done:
  ret void
partials.1:
  %".62" = phi  i64 [%".54", %"chunk"], [%".69", %"partials.1"]
  %".63" = phi  double [             0x0, %"chunk"], [%".68", %"partials.1"]
  %".64" = mul i64 %".62", 1
  %".65" = add i64 %".64", 0
  %".66" = getelementptr double, ptr %"partials", i64 %".65"
  %".67" = load double, ptr %".66"
  %".68" = fadd double %".63", %".67"
  %".69" = add i64 %".62", 1
  %".70" = icmp slt i64 %".69", %".59"
  br i1 %".70", label %"partials.1", label %"partials.done"
partials.done:
  %".72" = phi  double [             0x0, %"chunk"], [%".68", %"partials.1"]
  %"v12.sqrt" = call double @"llvm.sqrt.f64"(double %".72")
  %"v13.cmplt" = fcmp olt double %"clip_norm", %"v12.sqrt"
  %"v14.div" = fdiv contract double %"clip_norm", %"v12.sqrt"
  %"v16.where" = select  i1 %"v13.cmplt", double %"v14.div", double 0x3ff0000000000000
  %"v17.cast" = fptrunc double %"v16.where" to float
  %"v24.sub" = fsub contract float 0x3ff0000000000000, %"dampening"
  call void @"stepjit_sgd_momentum_clip_bfloat16_bfloat16_8c7e8b2a_update_body"(ptr %".38", ptr %".42", ptr %".46", float %"lr", i1 %"first", float %"scale", float %"v17.cast", float %"momentum", float %"v24.sub", i64 %".31", i64 %".34")
  %".80" = add i64 %"c", 1
  %".81" = icmp slt i64 %".80", %"c1"
  br i1 %".81", label %"chunk", label %"done"
}

declare double @"llvm.sqrt.f64"(double %".1")
